using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using static VlmTune.Checkpoints.IterCheckpoint;

namespace VlmTune.Training;

/// <summary>
/// The trainer's files in its work dir: reading a checkpoint's own files on resume (<c>trainer_state.json</c>,
/// <c>optimizer.bin</c>) with one clear line for a damaged or hand-edited file (which file, which field, what was
/// expected, what to do), the temporaries of killed runs, and where the work dir may be.
/// </summary>
internal static class CheckpointFiles
{
    /// <summary>
    /// Removes what killed runs left in the work dir: half-written checkpoint folders, a checkpoint set aside for its
    /// replacement (only once the replacement is in place) and temporary files of the <c>last_checkpoint</c> pointer.
    /// Only those of dead processes: another run may be saving into the same work dir.
    /// </summary>
    public static void RemoveStaleTemporaries(string workDir, Action<string> log)
    {
        static bool Iter(string name, string marker) =>
            (name.StartsWith(".iter_", StringComparison.Ordinal) || name.StartsWith($".{BestFolder}{marker}", StringComparison.Ordinal)) && name.Contains(marker, StringComparison.Ordinal);
        var removed = IO.OwnedTemporary.RemoveStale(workDir,
            n => Iter(n, TempMarker) || n.StartsWith(LastCheckpointFile + ".tmp-", StringComparison.Ordinal)).ToList();
        removed.AddRange(IO.OwnedTemporary.RemoveStale(workDir,
            n => Iter(n, OldMarker) && Directory.Exists(Path.Combine(workDir, n[1..n.IndexOf(OldMarker, StringComparison.Ordinal)]))));
        foreach (var path in removed) log($"removed {path}, left by an interrupted run");
    }

    /// <summary>The work dir must be a folder outside the model folder (symlinks followed): checkpoints must not land in the model.</summary>
    public static IEnumerable<string> WorkDirProblems(TrainConfig config)
    {
        string workDir = config.ResolvedWorkDir;
        if (File.Exists(workDir))
            yield return $"'work_dir': {Path.GetFullPath(workDir)} is a file{(config.Data.Any(d => IO.RealPath.SameFile(d, workDir)) ? " (a data file)" : "")}";
        else if (Directory.Exists(config.Model) && IO.RealPath.IsSameOrInside(workDir, config.Model))
            yield return $"'work_dir': {Path.GetFullPath(workDir)} is {(IO.RealPath.Of(workDir) == IO.RealPath.Of(config.Model) ? "" : "inside ")}" +
                         $"the model folder {Path.GetFullPath(config.Model)}; write checkpoints elsewhere";
    }

    private const string Fix = "the checkpoint is damaged; resume from an earlier iter_<n> (or start fresh without --resume)";

    /// <summary>trainer_state.json as a JSON object.</summary>
    public static JsonObject ReadState(string path)
    {
        JsonNode? node;
        try { node = JsonNode.Parse(File.ReadAllText(path), documentOptions: new JsonDocumentOptions { AllowDuplicateProperties = false }); }
        catch (JsonException e) { throw new VlmTuneException($"--resume: {path} is not valid JSON ({e.Message}); {Fix}."); }
        return node as JsonObject ?? throw new VlmTuneException($"--resume: {path} must hold a JSON object, not {Kind(node)}; {Fix}.");
    }

    /// <summary>An integer field; <paramref name="fallback"/> stands in for an absent one (fields older checkpoints lack).</summary>
    public static long Integer(JsonObject state, string key, string path, long? fallback = null)
    {
        var node = state[key];
        if (node is null && fallback is { } f) return f;
        if (node is JsonValue v && v.GetValueKind() == JsonValueKind.Number && v.TryGetValue<long>(out long x)) return x;
        throw new VlmTuneException($"--resume: {path}: '{key}' must be an integer, not {Kind(node)}; {Fix}.");
    }

    /// <summary>An array of strings.</summary>
    public static IReadOnlyList<string> Strings(JsonObject state, string key, string path)
    {
        if (state[key] is JsonArray array && array.All(n => n is JsonValue v && v.GetValueKind() == JsonValueKind.String))
            return array.Select(n => n!.GetValue<string>()).ToList();
        throw new VlmTuneException($"--resume: {path}: '{key}' must be a list of strings, not {Kind(state[key])}; {Fix}.");
    }

    /// <summary>An object field.</summary>
    public static JsonObject Object(JsonObject state, string key, string path) =>
        state[key] as JsonObject ?? throw new VlmTuneException($"--resume: {path}: '{key}' must be an object, not {Kind(state[key])}; {Fix}.");

    private static string Kind(JsonNode? node) => node switch
    {
        null => "missing",
        JsonObject => "an object",
        JsonArray => "a list",
        JsonValue v => $"{v.GetValueKind().ToString().ToLowerInvariant()} {Shorten(v.ToJsonString())}",
        _ => node.ToJsonString(),
    };

    private static string Shorten(string text) => text.Length > 40 ? text[..40] + "…" : text;

    /// <summary>
    /// Loads the optimizer state, reporting a truncated, overlong or foreign file in one line with the size this run's
    /// optimizer state has (what the file must hold).
    /// </summary>
    public static void LoadOptimizer(TorchSharp.Modules.OptimizerHelper optimizer, string path) =>
        LoadOptimizer(path, optimizer.load_state_dict, optimizer.save_state_dict, "AdamW state");

    /// <summary>
    /// The same for any optimizer state: <paramref name="load"/> reads it, <paramref name="save"/> writes this run's
    /// (for its size); <paramref name="what"/> names it in the message.
    /// </summary>
    public static void LoadOptimizer(string path, Action<BinaryReader> load, Action<BinaryWriter> save, string what)
    {
        long length = new FileInfo(path).Length;
        string? problem = null;
        try
        {
            using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20);
            using var reader = new BinaryReader(stream);
            load(reader);
            if (stream.Position != length) problem = $"{length - stream.Position} bytes follow the optimizer state";
        }
        catch (EndOfStreamException) { problem = "it ends early (truncated: an interrupted copy or a full disk?)"; }
        catch (Exception e) when (e is InvalidDataException or ArgumentException or FormatException or OverflowException or IOException)
        {
            problem = $"it does not hold this run's optimizer state ({e.Message})";
        }
        if (problem is null) return;
        throw new VlmTuneException($"--resume: {path} is damaged: {problem}; this run's {what} takes {SerializedSize(save)} bytes, " +
                                   $"the file has {length}. {char.ToUpperInvariant(Fix[0])}{Fix[1..]}.");
    }

    /// <summary>Bytes the optimizer's state takes in its file format (determined by the tensors' shapes, not their values).</summary>
    private static long SerializedSize(Action<BinaryWriter> save)
    {
        using var counter = new CountingStream();
        using (var writer = new BinaryWriter(counter, System.Text.Encoding.UTF8, leaveOpen: true))
            save(writer);
        return counter.Length;
    }

    /// <summary>A write-only stream that keeps only the count.</summary>
    private sealed class CountingStream : Stream
    {
        private long _length;
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => _length;
        public override long Position { get => _length; set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => _length += count;
        public override void Write(ReadOnlySpan<byte> buffer) => _length += buffer.Length;
        public override void WriteByte(byte value) => _length++;
    }
}
