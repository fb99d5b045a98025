using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using VlmTune.IO;
using VlmTune.Text;
using VlmTune.Vision;

namespace VlmTune.Data;

/// <summary>Why a line of the raw Oogiri-GO file was left out.</summary>
public enum OogiriSkipReason { BadLine, Type, MissingImage, EmptyText, ImageOutside }

public sealed record OogiriSkip(long Line, OogiriSkipReason Reason, string Detail);

public sealed record OogiriOptions
{
    /// <summary>The prompt for lines whose question is null or empty; the original conversion script's, ASCII comma included.</summary>
    public const string DefaultPrompt = "请你根据这张图片,讲一个脑洞大开的梗。";

    /// <summary>Line types kept (I2T: image to text).</summary>
    public IReadOnlySet<string> Types { get; init; } = new HashSet<string>(StringComparer.Ordinal) { "I2T" };
    public string Prompt { get; init; } = DefaultPrompt;
    /// <summary>Fail on the first malformed line instead of skipping it.</summary>
    public bool Strict { get; init; }
    /// <summary>Test aid: the pause point of <see cref="RuntimeSwitches.TestPause"/> (VLMTUNE_TEST_PAUSE); null: none.</summary>
    public string? TestPause { get; init; }
}

public sealed record OogiriResult(long Read, long Kept, IReadOnlyList<OogiriSkip> Skipped)
{
    public long Count(OogiriSkipReason reason) => Skipped.Count(s => s.Reason == reason);
}

/// <summary>
/// Converts CLoT's Oogiri-GO jsonl (<c>{"type", "question", "image", "text", "star"}</c> per line, images at
/// <c>images/&lt;image&gt;.jpg</c> beside it) into InternVL single-image chat records with the image's width and
/// height. Nothing is dropped silently: every skipped line is counted by reason and listed with its line number (a line
/// that is not valid UTF-8 too, rather than read with replacement characters). The input is never written: an output
/// that is the input under another name, a symlink or a hard link is refused. The output appears complete or not at
/// all (a temporary sibling renamed at the end); temporaries of killed conversions are removed when the next starts.
/// </summary>
public static class OogiriConverter
{
    public static OogiriResult Convert(string input, string output, OogiriOptions? options = null, IProgress<double>? progress = null,
        CancellationToken cancel = default)
    {
        options ??= new OogiriOptions();
        var inputFull = Path.GetFullPath(input);
        if (!File.Exists(inputFull)) throw new VlmTuneException($"input file not found: {inputFull}");
        var folder = Path.GetDirectoryName(inputFull)!;
        var outputFull = Path.GetFullPath(output);
        if (RealPath.SameFile(inputFull, outputFull) || RealPath.Of(inputFull) == RealPath.Of(outputFull))
            throw new VlmTuneException($"--output {outputFull} is the input file {inputFull}{Via(outputFull, inputFull)}; write the converted records to a new file.");
        if (Directory.Exists(outputFull)) throw new VlmTuneException($"--output {outputFull} is a folder; name a .json or .jsonl file.");
        var jsonLines = outputFull.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase);
        var outputDir = Path.GetDirectoryName(outputFull)!;
        Directory.CreateDirectory(outputDir);
        OwnedTemporary.RemoveStale(outputDir, n => n.StartsWith(Path.GetFileName(outputFull) + ".tmp-", StringComparison.Ordinal));
        var images = new ImageFolder(folder);

        var skipped = new List<OogiriSkip>();
        long read = 0, kept = 0;
        var temp = OwnedTemporary.Beside(outputFull);
        try
        {
            using (var inputStream = new FileStream(inputFull, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16))
            using (var outputStream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 16))
            {
                var lines = new Utf8LineReader(inputStream, inputFull);
                var writer = new RecordWriter(outputStream, jsonLines);
                var lastReport = 0L;
                while (lines.Next() is var (lineNumber, line, badUtf8))
                {
                    cancel.ThrowIfCancellationRequested();
                    if (line is not null && string.IsNullOrWhiteSpace(line)) continue;
                    read++;
                    if (progress is not null && inputStream.Position - lastReport > 1 << 20)
                    {
                        lastReport = inputStream.Position;
                        progress.Report((double)inputStream.Position / Math.Max(1, inputStream.Length));
                    }
                    var skip = line is null
                        ? new OogiriSkip(lineNumber, OogiriSkipReason.BadLine, Utf8LineReader.Problem(badUtf8))
                        : ConvertLine(line, lineNumber, images, options, writer, kept);
                    if (skip is null)
                    {
                        kept++;
                        if (kept == 1) Diagnostics.TestPause.At(options.TestPause, "convert-record", cancel);
                        continue;
                    }
                    if (skip.Reason == OogiriSkipReason.BadLine && options.Strict)
                        throw new VlmTuneException($"{inputFull}:{lineNumber}: {skip.Detail} (--strict stops at malformed lines; without it they are skipped and reported)");
                    skipped.Add(skip);
                }
                cancel.ThrowIfCancellationRequested();
                writer.Finish();
                outputStream.Flush(flushToDisk: true);
            }
            File.Move(temp, outputFull, overwrite: true);
        }
        catch (Exception e) when (DiskFull.Is(e))
        {
            throw DiskFull.Error(Path.GetFileName(outputFull), outputDir, $"{outputFull} was not written", e);
        }
        finally
        {
            if (File.Exists(temp)) File.Delete(temp);
        }
        progress?.Report(1.0);
        return new OogiriResult(read, kept, skipped);
    }

    /// <summary>How an output path that differs from the input's reaches it: a symlink, or a hard link.</summary>
    private static string Via(string output, string input) =>
        output == input ? "" : RealPath.Of(output) is var real && real != output ? $" (through {real})" : " (a hard link to it)";

    /// <summary>
    /// Where images may come from: the dataset folder and its <c>images/</c> folder, each with its symlinks followed
    /// (so <c>images/</c> may link to another disk); an image that is a symlink to elsewhere is left out.
    /// </summary>
    private sealed class ImageFolder(string folder)
    {
        private readonly string _realFolder = RealPath.Of(folder), _realImages = RealPath.Of(Path.Combine(folder, "images"));

        public string Folder { get; } = folder;

        public bool Contains(string path, out string real)
        {
            real = RealPath.Of(path);
            return RealPath.IsSameOrInsideResolved(real, _realFolder) || RealPath.IsSameOrInsideResolved(real, _realImages);
        }
    }

    /// <summary>Writes the record for one line, or says why the line is skipped.</summary>
    private static OogiriSkip? ConvertLine(string line, long lineNumber, ImageFolder folder, OogiriOptions options, RecordWriter writer, long id)
    {
        JsonDocument doc;
        try { doc = JsonDocument.Parse(line); }
        catch (JsonException e)
        {
            return new OogiriSkip(lineNumber, OogiriSkipReason.BadLine, $"not valid JSON at column {(e.BytePositionInLine ?? 0) + 1}: {JsonRecords.Describe(e)}");
        }
        using (doc)
        {
            try { return ConvertRecord(doc.RootElement, lineNumber, folder, options, writer, id); }
            catch (InvalidOperationException e) // System.Text.Json refuses strings such as a lone "\ud83d" escape: not text
            {
                return new OogiriSkip(lineNumber, OogiriSkipReason.BadLine, $"a string is not valid text: {e.Message}");
            }
        }
    }

    private static OogiriSkip? ConvertRecord(JsonElement root, long lineNumber, ImageFolder images, OogiriOptions options, RecordWriter writer, long id)
    {
        if (root.ValueKind != JsonValueKind.Object) return new OogiriSkip(lineNumber, OogiriSkipReason.BadLine, "not a JSON object");
        var type = root.TryGetProperty("type", out var t) && t.ValueKind == JsonValueKind.String ? t.GetString()! : null;
        if (type is null) return new OogiriSkip(lineNumber, OogiriSkipReason.BadLine, "no 'type' string");
        if (!options.Types.Contains(type)) return new OogiriSkip(lineNumber, OogiriSkipReason.Type, $"type {type}");

        var stem = root.TryGetProperty("image", out var img) ? img.ValueKind switch
        {
            JsonValueKind.String => img.GetString(),
            JsonValueKind.Number => img.GetRawText(),
            _ => null,
        } : null;
        if (string.IsNullOrEmpty(stem) || stem.Contains('/') || stem.Contains('\\') || stem.Contains(".."))
            return new OogiriSkip(lineNumber, OogiriSkipReason.BadLine, stem is null ? "no 'image' name" : $"image name '{stem}' is not a plain file name");
        var relative = $"images/{stem}.jpg";
        var imagePath = Path.Combine(images.Folder, "images", stem + ".jpg");
        if (!File.Exists(imagePath)) return new OogiriSkip(lineNumber, OogiriSkipReason.MissingImage, $"{relative} not found");
        if (!images.Contains(imagePath, out var real))
            return new OogiriSkip(lineNumber, OogiriSkipReason.ImageOutside, $"{relative} is a symlink to {real}, outside the dataset folder");
        ImageInfo size;
        try { size = ImageDecoder.ReadInfo(imagePath); }
        catch (ImageException e) { return new OogiriSkip(lineNumber, OogiriSkipReason.MissingImage, $"{relative} has no readable image header: {e.Message}"); }

        var text = root.TryGetProperty("text", out var x) && x.ValueKind == JsonValueKind.String ? x.GetString() : null;
        if (string.IsNullOrWhiteSpace(text)) return new OogiriSkip(lineNumber, OogiriSkipReason.EmptyText, "empty text");

        var question = root.TryGetProperty("question", out var q) && q.ValueKind == JsonValueKind.String ? q.GetString() : null;
        if (string.IsNullOrEmpty(question)) question = options.Prompt;

        writer.Write(id, relative, size.Width, size.Height, question, text);
        return null;
    }

    /// <summary>
    /// Writes records as a JSON array indented by 4 (like Python's <c>json.dump(indent=4, ensure_ascii=False)</c>)
    /// or as JSON lines, with non-ASCII text written as is.
    /// </summary>
    private sealed class RecordWriter
    {
        private readonly Stream _stream;
        private readonly bool _jsonLines;
        private readonly Utf8JsonWriter _writer;

        public RecordWriter(Stream stream, bool jsonLines)
        {
            _stream = stream;
            _jsonLines = jsonLines;
            _writer = new Utf8JsonWriter(stream, new JsonWriterOptions
            {
                Encoder = MinimalJsonEncoder.Instance,
                Indented = !jsonLines,
                IndentSize = 4,
                NewLine = "\n",
            });
            if (!jsonLines) _writer.WriteStartArray();
        }

        public void Write(long id, string image, int width, int height, string question, string text)
        {
            _writer.WriteStartObject();
            _writer.WriteNumber("id", id);
            _writer.WriteString("image", image);
            _writer.WriteNumber("width", width);
            _writer.WriteNumber("height", height);
            _writer.WriteStartArray("conversations");
            _writer.WriteStartObject();
            _writer.WriteString("from", ConversationTurn.Human);
            _writer.WriteString("value", ImagePlaceholders.Placeholder + "\n" + question);
            _writer.WriteEndObject();
            _writer.WriteStartObject();
            _writer.WriteString("from", ConversationTurn.Gpt);
            _writer.WriteString("value", text);
            _writer.WriteEndObject();
            _writer.WriteEndArray();
            _writer.WriteEndObject();
            if (_jsonLines)
            {
                _writer.Flush();
                _stream.WriteByte((byte)'\n');
                _writer.Reset(_stream);
            }
        }

        public void Finish()
        {
            if (!_jsonLines) _writer.WriteEndArray();
            _writer.Flush();
            if (!_jsonLines) _stream.WriteByte((byte)'\n');
        }
    }
}

/// <summary>
/// Escapes only what JSON requires (quote, backslash, control characters), so Chinese text and emoji are written
/// as themselves, as Python's <c>ensure_ascii=False</c> does. Output is UTF-8 and never embedded in HTML.
/// </summary>
public sealed class MinimalJsonEncoder : JavaScriptEncoder
{
    public static readonly MinimalJsonEncoder Instance = new();

    public override int MaxOutputCharactersPerInputCharacter => 6; // \uXXXX

    public override bool WillEncode(int unicodeScalar) => unicodeScalar < 0x20 || unicodeScalar == '"' || unicodeScalar == '\\';

    public override unsafe int FindFirstCharacterToEncode(char* text, int textLength)
    {
        for (var i = 0; i < textLength; i++)
        {
            var c = text[i];
            if (c < 0x20 || c == '"' || c == '\\') return i;
            if (char.IsSurrogate(c))
            {
                // A lone surrogate is not text; a valid pair passes through.
                if (!char.IsHighSurrogate(c) || i + 1 >= textLength || !char.IsLowSurrogate(text[i + 1])) return i;
                i++;
            }
        }
        return -1;
    }

    public override unsafe bool TryEncodeUnicodeScalar(int unicodeScalar, char* buffer, int bufferLength, out int numberOfCharactersWritten)
    {
        var escaped = unicodeScalar switch
        {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            '\b' => "\\b",
            '\f' => "\\f",
            < 0x20 => $"\\u{unicodeScalar:x4}",
            _ => char.ConvertFromUtf32(unicodeScalar),
        };
        if (escaped.Length > bufferLength) { numberOfCharactersWritten = 0; return false; }
        for (var i = 0; i < escaped.Length; i++) buffer[i] = escaped[i];
        numberOfCharactersWritten = escaped.Length;
        return true;
    }
}
