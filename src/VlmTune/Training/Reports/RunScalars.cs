using System.Text;
using System.Text.Json;

namespace VlmTune.Training.Reports;

/// <summary>One logged training iteration of <c>vis_data/scalars.json</c>; a value the line lacks (or holds as null) is null.</summary>
public sealed record TrainPoint(
    long Iter, double? Loss, double? Lr, double? GradNorm, double? TokensPerSecond, double? Time, double? DataTime,
    double? Memory, long? OptimizerStep);

/// <summary>One evaluation line of <c>vis_data/scalars.json</c>: <c>{"eval_loss": 1.23, "iter": 40, "step": 40}</c>.</summary>
public sealed record EvalPoint(long Iter, double EvalLoss);

/// <summary>
/// The scalars of a run as <see cref="TrainLog"/> writes them: one JSON object per line, training lines (with
/// <c>loss</c>, null for a skipped window) and evaluation lines (with <c>eval_loss</c> and no <c>loss</c>). Keys this
/// reader does not know are ignored, so newer writers stay readable.
/// </summary>
public sealed class RunScalars
{
    public const string RelativePath = "vis_data/scalars.json";

    public required string Path { get; init; }
    public required IReadOnlyList<TrainPoint> Train { get; init; }
    public required IReadOnlyList<EvalPoint> Eval { get; init; }
    /// <summary>Newline-terminated lines read (blank ones included), i.e. the number of the last complete line.</summary>
    public int Lines { get; init; }
    /// <summary>The file ended in a line without its newline: one being written, or cut by a kill. It was left out.</summary>
    public bool PartialLastLine { get; init; }
    /// <summary>Lenient reads only: the first bad line ("line N: ..."), which was skipped with any others.</summary>
    public string? Problem { get; init; }

    public bool IsEmpty => Train.Count == 0 && Eval.Count == 0;

    /// <summary>
    /// Reads the file and fails on the first bad line, or on a file without any iteration, with one line naming the
    /// file and the line. A trailing line without its newline is left out (see <see cref="PartialLastLine"/>).
    /// </summary>
    public static RunScalars Read(string path)
    {
        var scalars = Parse(ReadShared(path), path, strict: true);
        if (scalars.IsEmpty)
            throw new VlmTuneException($"{path}: no iteration logged yet ({(scalars.Lines == 0 ? "the file is empty" : "only blank lines")}).");
        return scalars;
    }

    /// <summary>For a live run: bad lines are skipped (the first one is kept in <see cref="Problem"/>), an empty file is no error.</summary>
    public static RunScalars ReadLenient(string path) => Parse(ReadShared(path), path, strict: false);

    // The trainer keeps the file open for appending; reading must not ask for exclusive access.
    private static string ReadShared(string path)
    {
        if (!File.Exists(path)) throw new VlmTuneException($"{path} does not exist (not a vlmtune run folder, or no iteration logged yet).");
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        using var reader = new StreamReader(stream, Encoding.UTF8);
        return reader.ReadToEnd();
    }

    public static RunScalars Parse(string text, string path, bool strict)
    {
        var train = new List<TrainPoint>();
        var eval = new List<EvalPoint>();
        string? problem = null;
        int lineNumber = 0, start = 0;
        bool partial = false;
        while (start < text.Length)
        {
            int end = text.IndexOf('\n', start);
            if (end < 0) { partial = !string.IsNullOrWhiteSpace(text[start..]); break; }
            lineNumber++;
            string line = text[start..end].TrimEnd('\r');
            start = end + 1;
            if (string.IsNullOrWhiteSpace(line)) continue;
            string? error = ParseLine(line, train, eval);
            if (error is null) continue;
            if (strict) throw new VlmTuneException($"{path}: line {lineNumber}: {error}");
            problem ??= $"line {lineNumber}: {error}";
        }
        return new RunScalars { Path = path, Train = train, Eval = eval, Lines = lineNumber, PartialLastLine = partial, Problem = problem };
    }

    private static string? ParseLine(string line, List<TrainPoint> train, List<EvalPoint> eval)
    {
        JsonDocument doc;
        try { doc = JsonDocument.Parse(line); }
        catch (JsonException e) { return $"not JSON ({e.Message.Split('.')[0]})"; }
        using (doc)
        {
            var o = doc.RootElement;
            if (o.ValueKind != JsonValueKind.Object) return $"expected a JSON object, got {Kind(o)}";
            if (!o.TryGetProperty("iter", out var iterElement) || !iterElement.TryGetInt64(out long iter))
                return "'iter' is missing or not an integer";
            string? error = null;
            double? Number(string key)
            {
                if (!o.TryGetProperty(key, out var v) || v.ValueKind == JsonValueKind.Null) return null;
                if (v.ValueKind == JsonValueKind.Number) return v.GetDouble();
                error ??= $"'{key}' is {Kind(v)}, expected a number or null";
                return null;
            }
            if (o.TryGetProperty("eval_loss", out _) && !o.TryGetProperty("loss", out _))
            {
                if (Number("eval_loss") is not { } evalLoss) return error ?? "'eval_loss' is null";
                eval.Add(new EvalPoint(iter, evalLoss));
                return null;
            }
            var point = new TrainPoint(iter, Number("loss"), Number("lr"), Number("grad_norm"), Number("tokens_per_s"), Number("time"),
                Number("data_time"), Number("memory"), Number("optimizer_step") is { } s ? (long)s : null);
            if (error is not null) return error;
            train.Add(point);
            return null;
        }
    }

    private static string Kind(JsonElement e) => e.ValueKind switch
    {
        JsonValueKind.String => "a string",
        JsonValueKind.Array => "an array",
        JsonValueKind.Object => "an object",
        JsonValueKind.True or JsonValueKind.False => "a boolean",
        JsonValueKind.Null => "null",
        _ => "a number",
    };
}
