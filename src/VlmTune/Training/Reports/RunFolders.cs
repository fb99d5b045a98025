using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace VlmTune.Training.Reports;

/// <summary>
/// A run folder <c>work_dirs/&lt;name&gt;/&lt;YYYYMMDD_HHMMSS&gt;/</c> found on disk. <see cref="Id"/> is its path relative to
/// the folder it was found from ("." for that folder itself), <see cref="Label"/> "&lt;work dir name&gt;/&lt;run name&gt;".
/// </summary>
public sealed record RunFolder(string Dir, string Id, string Label)
{
    /// <summary>The work dir: where the run's checkpoints (<c>iter_N/</c>) are, shared by the runs of one config (resumes).</summary>
    public string WorkDir => Path.GetDirectoryName(Dir) ?? Dir;
    public string ScalarsPath => Path.Combine(Dir, "vis_data", "scalars.json");
    public string ConfigPath => Path.Combine(Dir, "vis_data", "config.yaml");
    public string EvalDir => Path.Combine(Dir, "eval");

    /// <summary>The mmengine log (<c>&lt;timestamp&gt;.log</c>; a second run in the same second gets <c>_1</c> on the folder only).</summary>
    public string? LogPath => Directory.Exists(Dir)
        ? Directory.EnumerateFiles(Dir, "*.log").OrderByDescending(File.GetLastWriteTimeUtc).FirstOrDefault()
        : null;
}

/// <summary>A complete checkpoint of a work dir (an <c>iter_N/</c> folder with its trainer_state.json).</summary>
public sealed record CheckpointInfo(string Name, long Iter, long Bytes, DateTime Modified);

/// <summary>Where a run is, from the last <c>Iter(train)</c> line of its log and the lines that end a run.</summary>
public sealed record RunProgress(long? Iter, long? TotalIters, string? Eta, DateTime? LastLine, string State)
{
    public const string Running = "running", Finished = "finished", Interrupted = "interrupted", Starting = "starting";
}

/// <summary>One answer of an evaluation file: what the model said to a held-out sample.</summary>
public sealed record EvalAnswer(int Index, IReadOnlyList<string> Images, string Question, string Reference, string Answer);

/// <summary><c>&lt;run dir&gt;/eval/iter_&lt;N&gt;.json</c> = <c>{"iter": N, "eval_loss": L, "answers": [...]}</c>.</summary>
public sealed record EvalFile(long Iter, double? EvalLoss, IReadOnlyList<EvalAnswer> Answers, string Path);

/// <summary>Finds run folders and reads what the dashboard shows of them; every reader tolerates a run still being written.</summary>
public static partial class RunFolders
{
    /// <summary>
    /// The run folders at or under <paramref name="root"/>: the root itself when it is a run folder, else those at most
    /// three levels down (a work dir, a folder of work dirs, or a project with work_dirs/ in it), ordered by label.
    /// A run folder is one with <c>vis_data/scalars.json</c>.
    /// </summary>
    public static IReadOnlyList<RunFolder> Find(string root)
    {
        root = Path.GetFullPath(root);
        if (!Directory.Exists(root)) throw new VlmTuneException($"{root} is not a folder (expected a work dir, a run folder or a folder of work dirs).");
        var found = new List<RunFolder>();
        Walk(root, 0);
        return found.OrderBy(r => r.Label, StringComparer.Ordinal).ThenBy(r => r.Id, StringComparer.Ordinal).ToList();

        void Walk(string dir, int depth)
        {
            if (IsRun(dir))
            {
                string id = Path.GetRelativePath(root, dir).Replace(Path.DirectorySeparatorChar, '/');
                found.Add(new RunFolder(dir, id, $"{Path.GetFileName(Path.GetDirectoryName(dir))}/{Path.GetFileName(dir)}"));
                return;
            }
            if (depth == 3) return;
            IEnumerable<string> children;
            try { children = Directory.EnumerateDirectories(dir).ToList(); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return; }
            foreach (var child in children)
            {
                string name = Path.GetFileName(child);
                // Checkpoints, caches and hidden temporaries hold no runs, and some hold many files.
                if (name.StartsWith('.') || CheckpointName().IsMatch(name) || name is "vision_cache" or "vis_data" or "eval") continue;
                Walk(child, depth + 1);
            }
        }
    }

    public static bool IsRun(string dir) => File.Exists(Path.Combine(dir, "vis_data", "scalars.json"));

    /// <summary>The complete checkpoints of a work dir, by iteration.</summary>
    public static IReadOnlyList<CheckpointInfo> Checkpoints(string workDir)
    {
        var list = new List<CheckpointInfo>();
        if (!Directory.Exists(workDir)) return list;
        foreach (var dir in Directory.EnumerateDirectories(workDir, "iter_*"))
        {
            var m = CheckpointName().Match(Path.GetFileName(dir));
            string state = Path.Combine(dir, VlmTune.Checkpoints.IterCheckpoint.StateFile);
            if (!m.Success || !File.Exists(state)) continue;   // a checkpoint without its state is not one (see Trainer)
            try
            {
                long bytes = new DirectoryInfo(dir).EnumerateFiles("*", SearchOption.AllDirectories).Sum(f => f.Length);
                list.Add(new CheckpointInfo(Path.GetFileName(dir), long.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture), bytes, File.GetLastWriteTimeUtc(state)));
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }   // removed while listed (save_total_limit)
        }
        return list.OrderBy(c => c.Iter).ToList();
    }

    /// <summary>Reads the end of the log: the last iteration line's progress and ETA, and whether the run has ended.</summary>
    public static RunProgress Progress(string? logPath)
    {
        if (logPath is null || !File.Exists(logPath)) return new RunProgress(null, null, null, null, RunProgress.Starting);
        string tail = Tail(logPath, 256 * 1024);
        long? iter = null, total = null;
        string? eta = null;
        DateTime? last = null;
        var lines = tail.Split('\n');
        foreach (var line in lines.Reverse())
        {
            var m = IterLine().Match(line);
            if (!m.Success) continue;
            iter = long.Parse(m.Groups["iter"].Value, CultureInfo.InvariantCulture);
            total = long.Parse(m.Groups["total"].Value, CultureInfo.InvariantCulture);
            eta = m.Groups["eta"].Value;
            break;
        }
        foreach (var line in lines.Reverse())
            if (line.Length >= 19 && DateTime.TryParseExact(line[..19], "yyyy/MM/dd HH:mm:ss", CultureInfo.InvariantCulture, DateTimeStyles.AssumeLocal, out var t))
            {
                last = t.ToUniversalTime();
                break;
            }
        // The last line that says how the run ended wins: a resumed run logs in a new folder, so one log holds one end.
        string state = tail.Contains("- training finished: ", StringComparison.Ordinal) ? RunProgress.Finished
            : tail.Contains("- interrupted; saving a checkpoint", StringComparison.Ordinal) ? RunProgress.Interrupted
            : iter is null ? RunProgress.Starting : RunProgress.Running;
        return new RunProgress(iter, total, eta, last, state);
    }

    /// <summary>The evaluation files of a run, by iteration; files that do not parse are left out.</summary>
    public static IReadOnlyList<EvalFile> Evals(RunFolder run)
    {
        var list = new List<EvalFile>();
        if (!Directory.Exists(run.EvalDir)) return list;
        foreach (var path in Directory.EnumerateFiles(run.EvalDir, "iter_*.json"))
        {
            if (!EvalName().IsMatch(Path.GetFileName(path))) continue;
            try { list.Add(ReadEval(path)); }
            catch (VlmTuneException) { }
        }
        return list.OrderBy(e => e.Iter).ToList();
    }

    /// <summary>The iterations that have an evaluation file, from the file names alone (cheap enough to ask on every poll).</summary>
    public static IReadOnlyList<long> EvalIters(RunFolder run) => Directory.Exists(run.EvalDir)
        ? Directory.EnumerateFiles(run.EvalDir, "iter_*.json").Select(Path.GetFileName).Where(n => EvalName().IsMatch(n!))
            .Select(n => long.TryParse(n!["iter_".Length..^".json".Length], NumberStyles.None, CultureInfo.InvariantCulture, out var i) ? i : -1)
            .Where(i => i >= 0).Order().ToList()
        : [];

    /// <summary>The evaluation file of iteration <paramref name="iter"/>, or null when there is none.</summary>
    public static EvalFile? Eval(RunFolder run, long iter)
    {
        string path = Path.Combine(run.EvalDir, $"iter_{iter.ToString(CultureInfo.InvariantCulture)}.json");
        return File.Exists(path) ? ReadEval(path) : null;
    }

    /// <summary>Reads an evaluation file; a malformed one is one line naming the file and what is wrong.</summary>
    public static EvalFile ReadEval(string path)
    {
        JsonDocument doc;
        try
        {
            using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
            doc = JsonDocument.Parse(stream);
        }
        catch (JsonException e) { throw new VlmTuneException($"{path}: not JSON (line {e.LineNumber + 1}: {e.Message.Split('.')[0]})"); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new VlmTuneException($"{path}: {e.Message}"); }
        using (doc)
        {
            var o = doc.RootElement;
            if (o.ValueKind != JsonValueKind.Object) throw new VlmTuneException($"{path}: expected a JSON object");
            if (!o.TryGetProperty("iter", out var iterElement) || !iterElement.TryGetInt64(out long iter))
                throw new VlmTuneException($"{path}: 'iter' is missing or not an integer");
            double? loss = o.TryGetProperty("eval_loss", out var l) && l.ValueKind == JsonValueKind.Number ? l.GetDouble() : null;
            var answers = new List<EvalAnswer>();
            if (o.TryGetProperty("answers", out var list) && list.ValueKind == JsonValueKind.Array)
            {
                int position = 0;
                foreach (var a in list.EnumerateArray())
                {
                    if (a.ValueKind != JsonValueKind.Object) throw new VlmTuneException($"{path}: answers[{position}] is not an object");
                    string Text(string key) => a.TryGetProperty(key, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString()! : "";
                    var images = a.TryGetProperty("images", out var im) && im.ValueKind == JsonValueKind.Array
                        ? im.EnumerateArray().Where(x => x.ValueKind == JsonValueKind.String).Select(x => x.GetString()!).ToList()
                        : [];
                    int index = a.TryGetProperty("index", out var ix) && ix.TryGetInt32(out int i) ? i : position;
                    answers.Add(new EvalAnswer(index, images, Text("question"), Text("reference"), Text("answer")));
                    position++;
                }
            }
            return new EvalFile(iter, loss, answers, path);
        }
    }

    private static string Tail(string path, int bytes)
    {
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        if (stream.Length > bytes) stream.Seek(-bytes, SeekOrigin.End);
        using var reader = new StreamReader(stream, Encoding.UTF8);
        return reader.ReadToEnd();
    }

    [GeneratedRegex(@"^iter_(\d+)$")]
    private static partial Regex CheckpointName();

    [GeneratedRegex(@"^iter_\d+\.json$")]
    private static partial Regex EvalName();

    [GeneratedRegex(@"Iter\(train\) \[\s*(?<iter>\d+)/(?<total>\d+)\]\s+lr: \S+\s+eta: (?<eta>.+?)\s+time: ")]
    private static partial Regex IterLine();
}
