using System.Text;

namespace VlmTune.Text;

/// <summary>
/// Incremental detokenizer for generation: <see cref="Push"/> one id at a time and get the text that became complete.
/// A character split over byte-fallback pieces (<c>&lt;0xF0&gt;&lt;0x9F&gt;&lt;0x98&gt;&lt;0x80&gt;</c> = 😀) is held back
/// (or the byte-level tokens of one character) until its last byte arrives, so the pieces of text returned always add up
/// to <see cref="TextTokenizer.Decode"/> of the same ids (after <see cref="Flush"/>).
/// </summary>
public sealed class TokenStreamDecoder
{
    private readonly TextTokenizer _tokenizer;
    private readonly bool _skipSpecialTokens;
    private readonly List<byte> _pending = [];     // bytes not yet turned into text: at most one unfinished character
    private readonly StringBuilder _text = new();
    private bool _atStart = true;

    public TokenStreamDecoder(TextTokenizer tokenizer, bool skipSpecialTokens = true)
    {
        _tokenizer = tokenizer ?? throw new ArgumentNullException(nameof(tokenizer));
        _skipSpecialTokens = skipSpecialTokens;
    }

    /// <summary>All text returned so far.</summary>
    public string Text => _text.ToString();

    /// <summary>Adds one id; returns the text it completes (empty while a character is still unfinished).</summary>
    public string Push(int id)
    {
        if (_tokenizer.IsAddedToken(id))
        {
            if (_skipSpecialTokens && _tokenizer.IsSpecial(id)) return "";
            // An added token is text of its own: whatever bytes were pending end here.
            var text = TakeText(complete: true) + _tokenizer.IdToToken(id);
            return Emit(text);
        }
        if (_skipSpecialTokens && _tokenizer.IsSpecial(id)) return "";
        // Checkpoints pad the embedding past the tokenizer (Qwen3: 151,936 rows for 151,678 ids), so a model can emit an
        // id that has no text: decoded as nothing, as Hugging Face's tokenizers do, rather than failing the answer.
        if (!_tokenizer.HasText(id)) return "";
        _pending.AddRange(_tokenizer.TokenBytes(id));
        return Emit(TakeText(complete: false));
    }

    /// <summary>Ends the stream: bytes of an unfinished character become U+FFFD, as in a full decode.</summary>
    public string Flush() => Emit(TakeText(complete: true));

    private string Emit(string text)
    {
        if (text.Length == 0) return text;
        if (_atStart && _tokenizer.StripLeadingSpaceOnDecode && text[0] == ' ') text = text[1..];
        _atStart = false;
        _text.Append(text);
        return text;
    }

    /// <summary>Decodes the pending bytes, keeping back a trailing character that more bytes could still finish.</summary>
    private string TakeText(bool complete)
    {
        var keep = complete ? 0 : Utf8.UnfinishedTailLength(_pending);
        var count = _pending.Count - keep;
        if (count == 0) return "";
        var text = Utf8.Decode(_pending, count, _tokenizer.InvalidUtf8);
        _pending.RemoveRange(0, count);
        return text;
    }
}

/// <summary>UTF-8 decoding with the U+FFFD rule of the tokenizer's reference implementation.</summary>
internal static class Utf8
{
    public static string Decode(List<byte> bytes, int count, Utf8Replacement replacement)
    {
        var span = System.Runtime.InteropServices.CollectionsMarshal.AsSpan(bytes)[..count];
        // .NET replaces each maximal subpart, as Python's errors="replace" and Rust's from_utf8_lossy do.
        if (replacement == Utf8Replacement.MaximalSubpart) return Encoding.UTF8.GetString(span);
        // Sentencepiece: every byte that does not start a well-formed sequence is one U+FFFD.
        var text = new StringBuilder(count);
        var pos = 0;
        while (pos < span.Length)
        {
            var length = WellFormedLength(span[pos..]);
            if (length == 0) { text.Append('\uFFFD'); pos++; continue; }
            text.Append(Encoding.UTF8.GetString(span.Slice(pos, length)));
            pos += length;
        }
        return text.ToString();
    }

    /// <summary>
    /// Length of the trailing bytes that begin a multi-byte character still missing bytes (0 if none): the lead byte
    /// and the continuation bytes after it, fewer than the lead byte announces.
    /// </summary>
    public static int UnfinishedTailLength(List<byte> bytes)
    {
        for (var back = 1; back <= Math.Min(3, bytes.Count); back++)
        {
            var b = bytes[^back];
            if (IsContinuation(b)) continue;
            var needed = SequenceLength(b);
            return needed > back ? back : 0;
        }
        return 0;
    }

    /// <summary>Length of the well-formed UTF-8 sequence at the start of <paramref name="s"/> (Unicode Table 3-7), 0 if none.</summary>
    private static int WellFormedLength(ReadOnlySpan<byte> s)
    {
        var b0 = s[0];
        if (b0 < 0x80) return 1;
        var length = SequenceLength(b0);
        if (length == 0 || s.Length < length) return 0;
        // The second byte's range depends on the lead byte (no overlongs, surrogates or code points past U+10FFFF).
        var (lo, hi) = b0 switch
        {
            0xE0 => (0xA0, 0xBF),
            0xED => (0x80, 0x9F),
            0xF0 => (0x90, 0xBF),
            0xF4 => (0x80, 0x8F),
            _ => (0x80, 0xBF),
        };
        if (s[1] < lo || s[1] > hi) return 0;
        for (var i = 2; i < length; i++)
            if (!IsContinuation(s[i])) return 0;
        return length;
    }

    private static int SequenceLength(byte lead) => lead switch
    {
        < 0x80 => 1,
        >= 0xC2 and <= 0xDF => 2,
        >= 0xE0 and <= 0xEF => 3,
        >= 0xF0 and <= 0xF4 => 4,
        _ => 0,   // continuation byte, or a byte that never starts a character
    };

    private static bool IsContinuation(byte b) => (b & 0xC0) == 0x80;
}
