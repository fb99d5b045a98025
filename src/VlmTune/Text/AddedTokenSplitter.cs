using System.Buffers;

namespace VlmTune.Text;

/// <summary>
/// Splits text at the tokens that must stay whole (added tokens such as <c>&lt;|im_start|&gt;</c>), as HF's slow
/// <c>PreTrainedTokenizer.tokenize</c> does: its trie finds them scanning left to right, the longest token starting at the
/// earliest position winning; then each token's <c>rstrip</c>/<c>lstrip</c> strips the white space of the text beside it
/// (Python's <c>str.strip</c> white space) and <c>single_word</c> glues a token that touches a word back into that text.
/// Everything between the tokens is plain text for the model.
/// </summary>
internal sealed class AddedTokenSplitter
{
    private readonly Dictionary<char, (string Token, int Id)[]> _byFirstChar;
    private readonly Dictionary<string, AddedTokenSpec> _tokens;
    private readonly SearchValues<char> _firstChars;
    private readonly bool _anyFlags;

    public AddedTokenSplitter(IEnumerable<AddedTokenSpec> tokens)
    {
        _tokens = tokens.Where(t => t.Content.Length > 0).ToDictionary(t => t.Content, StringComparer.Ordinal);
        _byFirstChar = _tokens.Values
            .GroupBy(t => t.Content[0])
            .ToDictionary(g => g.Key, g => g.OrderByDescending(t => t.Content.Length).Select(t => (t.Content, t.Id)).ToArray());
        _firstChars = SearchValues.Create([.. _byFirstChar.Keys]);
        _anyFlags = _tokens.Values.Any(t => t.LStrip || t.RStrip || t.SingleWord);
    }

    /// <summary>The parts of <paramref name="text"/> in order: plain text (<c>Id</c> = -1) or a whole token (its id); never empty.</summary>
    public List<(string Text, int Id)> Split(string text)
    {
        var parts = Match(text);
        if (_anyFlags) ApplyFlags(parts);
        var result = new List<(string, int)>(parts.Count);
        foreach (var part in parts)
        {
            if (part.Length == 0) continue;
            // As HF: a part is a token when its text is one (a stripped or glued part no longer is).
            result.Add(_tokens.TryGetValue(part, out var token) ? (part, token.Id) : (part, -1));
        }
        return result;
    }

    private List<string> Match(string text)
    {
        var parts = new List<string>();
        var textStart = 0;
        var pos = 0;
        while (pos < text.Length)
        {
            var next = text.AsSpan(pos).IndexOfAny(_firstChars);
            if (next < 0) break;
            pos += next;
            var token = LongestAt(text, pos);
            if (token is null) { pos++; continue; }
            if (pos > textStart) parts.Add(text[textStart..pos]);
            parts.Add(token);
            pos += token.Length;
            textStart = pos;
        }
        if (textStart < text.Length) parts.Add(text[textStart..]);
        return parts;
    }

    /// <summary>HF's loop over the split: strip the neighbours of lstrip/rstrip tokens, glue single_word tokens.</summary>
    private void ApplyFlags(List<string> parts)
    {
        for (var i = 0; i < parts.Count; i++)
        {
            if (!_tokens.TryGetValue(parts[i], out var token)) continue;
            var left = i > 0 ? parts[i - 1] : null;
            var right = i < parts.Count - 1 ? parts[i + 1] : null;
            if (token.RStrip && !string.IsNullOrEmpty(right)) parts[i + 1] = right = PythonText.LStrip(right);
            if (token.LStrip && !string.IsNullOrEmpty(left)) parts[i - 1] = left = PythonText.RStrip(left);
            if (token.SingleWord && !string.IsNullOrEmpty(left) && left[^1] != ' ')
            {
                parts[i - 1] += parts[i];
                parts[i] = "";
            }
            else if (token.SingleWord && !string.IsNullOrEmpty(right) && right[0] != ' ')
            {
                parts[i] += right;
                parts[i + 1] = "";
            }
        }
    }

    private string? LongestAt(string text, int pos)
    {
        foreach (var candidate in _byFirstChar[text[pos]])
            if (text.AsSpan(pos).StartsWith(candidate.Token, StringComparison.Ordinal)) return candidate.Token;
        return null;
    }
}

/// <summary>Python's notion of white space (<c>str.isspace</c>): .NET's plus U+001C..U+001F.</summary>
internal static class PythonText
{
    public static bool IsSpace(char c) => char.IsWhiteSpace(c) || c is >= '\u001C' and <= '\u001F';

    public static string LStrip(string s)
    {
        var start = 0;
        while (start < s.Length && IsSpace(s[start])) start++;
        return s[start..];
    }

    public static string RStrip(string s)
    {
        var end = s.Length;
        while (end > 0 && IsSpace(s[end - 1])) end--;
        return s[..end];
    }
}
