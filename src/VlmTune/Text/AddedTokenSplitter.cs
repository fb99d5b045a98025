using System.Buffers;

namespace VlmTune.Text;

/// <summary>
/// Splits text at the tokens that must stay whole (added tokens such as <c>&lt;|im_start|&gt;</c>, and user-defined
/// sentencepiece pieces), like HF's added-token trie: scanning left to right, the longest token starting at the
/// earliest position wins. Everything between them is plain text for sentencepiece.
/// </summary>
internal sealed class AddedTokenSplitter
{
    private readonly Dictionary<char, (string Token, int Id)[]> _byFirstChar;
    private readonly SearchValues<char> _firstChars;

    public AddedTokenSplitter(IEnumerable<KeyValuePair<string, int>> tokens)
    {
        _byFirstChar = tokens
            .Where(t => t.Key.Length > 0)
            .GroupBy(t => t.Key[0])
            .ToDictionary(g => g.Key, g => g.OrderByDescending(t => t.Key.Length).Select(t => (t.Key, t.Value)).ToArray());
        _firstChars = SearchValues.Create([.. _byFirstChar.Keys]);
    }

    /// <summary>The parts of <paramref name="text"/> in order: plain text (<c>Id</c> = -1) or a whole token (its id).</summary>
    public IEnumerable<(int Start, int Length, int Id)> Split(string text)
    {
        var textStart = 0;
        var pos = 0;
        while (pos < text.Length)
        {
            var next = text.AsSpan(pos).IndexOfAny(_firstChars);
            if (next < 0) break;
            pos += next;
            var match = Match(text, pos);
            if (match.Token is null) { pos++; continue; }
            if (pos > textStart) yield return (textStart, pos - textStart, -1);
            yield return (pos, match.Token.Length, match.Id);
            pos += match.Token.Length;
            textStart = pos;
        }
        if (textStart < text.Length) yield return (textStart, text.Length - textStart, -1);
    }

    private (string? Token, int Id) Match(string text, int pos)
    {
        foreach (var candidate in _byFirstChar[text[pos]])
            if (text.AsSpan(pos).StartsWith(candidate.Token, StringComparison.Ordinal)) return candidate;
        return (null, -1);
    }
}
