using System.Text;
using System.Text.Json;

namespace VlmTune.Data;

/// <summary>
/// One record of a JSONL file or one element of a JSON array, with its 1-based line and 0-based index, parsed on its
/// own; or the parse error in its place. The caller owns (and disposes) <see cref="Document"/>.
/// </summary>
internal readonly record struct RawRecord(long Line, long Index, JsonDocument? Document, string? Error);

/// <summary>
/// Streams the records of JSONL files and JSON arrays without ever holding a whole file: memory stays at the size of
/// the largest record, whatever the file size.
/// </summary>
internal static class JsonRecords
{
    private static readonly JsonDocumentOptions DocumentOptions = new() { MaxDepth = 256 };

    /// <summary>
    /// Each non-blank line of a JSONL file. A malformed line gives an error record and reading goes on; so does a line
    /// that is not UTF-8 (read with replacement characters it would be trained on as text).
    /// </summary>
    public static IEnumerable<RawRecord> ReadLines(string file, bool parse = true)
    {
        using var stream = new FileStream(file, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1);
        var reader = new Utf8LineReader(stream, file);
        long index = 0;
        while (reader.Next() is var (line, text, badByte))
        {
            if (text is not null && string.IsNullOrWhiteSpace(text)) continue;
            if (!parse) { yield return new RawRecord(line, index++, null, null); continue; }   // a record all the same
            if (text is null) { yield return new RawRecord(line, index++, null, Utf8LineReader.Problem(badByte)); continue; }
            JsonDocument? doc = null;
            string? error = null;
            try { doc = JsonDocument.Parse(text, DocumentOptions); }
            catch (JsonException e) { error = $"not valid JSON at column {(e.BytePositionInLine ?? 0) + 1}: {Describe(e)}"; }
            yield return new RawRecord(line, index++, doc, error);
        }
    }

    /// <summary>
    /// Each element of a top-level JSON array, read with <see cref="Utf8JsonReader"/> over a growing buffer. A syntax
    /// error ends the file (nothing after it can be trusted) with one error record naming its line.
    /// </summary>
    public static IEnumerable<RawRecord> ReadArray(string file, bool parse = true)
    {
        using var stream = new FileStream(file, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1);
        var buffer = new byte[1 << 16];
        int start = 0, end = 0; // unconsumed bytes are buffer[start..end)
        var final = false;
        var state = new JsonReaderState(new JsonReaderOptions { MaxDepth = 256 });
        var begun = false;
        var needMore = true;
        long line = 1; // line of buffer[start]
        long index = 0;
        var firstRead = true;
        while (true)
        {
            if (needMore)
            {
                if (final) { yield return new RawRecord(line, index, null, "unexpected end of file inside the JSON array"); yield break; }
                if (start > 0) { Buffer.BlockCopy(buffer, start, buffer, 0, end - start); end -= start; start = 0; }
                if (end == buffer.Length) Array.Resize(ref buffer, buffer.Length * 2); // one record larger than the buffer
                var n = stream.Read(buffer, end, buffer.Length - end);
                if (n == 0) final = true;
                end += n;
                if (firstRead && end >= 3 && buffer[0] == 0xEF && buffer[1] == 0xBB && buffer[2] == 0xBF) start = 3; // UTF-8 BOM
                firstRead = false;
            }

            Step step;
            int consumed = 0, elementStart = 0;
            string? error = null;
            long errorLine = line;
            try
            {
                step = NextStep(buffer.AsSpan(start, end - start), final, ref state, ref begun, out consumed, out elementStart);
            }
            catch (JsonException e)
            {
                step = Step.Error;
                error = $"not valid JSON: {Describe(e)}";
                errorLine = (e.LineNumber ?? 0) + 1;
            }

            switch (step)
            {
                case Step.Error:
                    yield return new RawRecord(errorLine, index, null, error);
                    yield break;
                case Step.NotArray:
                    yield return new RawRecord(line, index, null, "expected a JSON array of records ('[' first)");
                    yield break;
                case Step.NeedMore:
                    needMore = true;
                    continue;
            }

            needMore = false;
            var span = buffer.AsSpan(start, consumed);
            var elementLine = line + span[..elementStart].Count((byte)'\n');
            line += span.Count((byte)'\n');
            if (step == Step.Element)
            {
                JsonDocument? doc = null;
                string? parseError = null;
                if (parse)
                {
                    // Copy: the buffer is reused for the next record while the caller may still hold this one.
                    try { doc = JsonDocument.Parse(span[elementStart..].ToArray(), DocumentOptions); }
                    catch (JsonException e) { parseError = $"not valid JSON: {Describe(e)}"; }
                }
                start += consumed;
                yield return new RawRecord(elementLine, index++, doc, parseError);
                continue;
            }
            start += consumed;
            if (step == Step.End)
            {
                // Only whitespace may follow the closing bracket: anything else is data that would be silently lost.
                var (trailing, newlines) = TrailingContent(buffer.AsSpan(start, end - start), stream);
                if (trailing is not null) yield return new RawRecord(line + newlines, index, null, $"content after the closing ']' of the array: '{trailing}'");
                yield break;
            }
        }
    }

    /// <summary>The first non-whitespace bytes after the array (null if none) and the newlines before them.</summary>
    private static (string? Text, long Newlines) TrailingContent(ReadOnlySpan<byte> rest, Stream stream)
    {
        var chunk = new byte[4096];
        long newlines = 0;
        while (true)
        {
            var i = rest.IndexOfAnyExcept(" \t\r\n"u8);
            if (i >= 0) return (Encoding.UTF8.GetString(rest[i..Math.Min(rest.Length, i + 20)]), newlines + rest[..i].Count((byte)'\n'));
            newlines += rest.Count((byte)'\n');
            var n = stream.Read(chunk, 0, chunk.Length);
            if (n == 0) return (null, newlines);
            rest = chunk.AsSpan(0, n);
        }
    }

    private enum Step { Began, Element, End, NeedMore, NotArray, Error }

    private static Step NextStep(ReadOnlySpan<byte> data, bool final, ref JsonReaderState state, ref bool begun,
                                 out int consumed, out int elementStart)
    {
        consumed = 0;
        elementStart = 0;
        var reader = new Utf8JsonReader(data, final, state);
        if (!reader.Read()) return Step.NeedMore;
        if (!begun)
        {
            if (reader.TokenType != JsonTokenType.StartArray) return Step.NotArray;
            begun = true;
            consumed = (int)reader.BytesConsumed;
            state = reader.CurrentState;
            return Step.Began;
        }
        if (reader.TokenType == JsonTokenType.EndArray)
        {
            consumed = (int)reader.BytesConsumed;
            state = reader.CurrentState;
            return Step.End;
        }
        elementStart = (int)reader.TokenStartIndex;
        if (!reader.TrySkip()) return Step.NeedMore; // the element goes on past the buffer: read more, then retry it whole
        consumed = (int)reader.BytesConsumed;
        state = reader.CurrentState;
        return Step.Element;
    }

    /// <summary>The parser's message without its own line numbers (ours name the file line instead).</summary>
    internal static string Describe(JsonException e)
    {
        var message = e.Message;
        var cut = message.IndexOf(" LineNumber:", StringComparison.Ordinal);
        return cut > 0 ? message[..cut].TrimEnd('.', ' ') : message;
    }
}
