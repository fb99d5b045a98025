using System.Globalization;
using System.Text.Json;
using VlmTune.Training.Reports;

namespace VlmTune.Training;

/// <summary>One logged iteration: what goes on the log line and into vis_data/scalars.json.</summary>
public sealed record IterationStats(
    long Iter, long TotalIters, double Lr, double Eta, double Time, double DataTime, long MemoryMb, double Loss,
    double? GradNorm, double TokensPerSecond, double? Mfu, long OptimizerStep);

/// <summary>
/// The run folder <c>work_dirs/&lt;name&gt;/&lt;YYYYMMDD_HHMMSS&gt;/</c> as mmengine lays it out: <c>&lt;timestamp&gt;.log</c> with
/// mmengine-format lines, <c>vis_data/scalars.json</c> (one JSON object per logged iteration) and
/// <c>vis_data/config.yaml</c> (the resolved config); with <c>report_to: tensorboard</c> also TensorBoard event files in
/// <c>vis_data/</c>; and when it is closed, <c>curves.png</c> (<see cref="TrainingCurves"/>). Every line also goes to
/// <see cref="Echo"/>.
/// </summary>
public sealed class TrainLog : IDisposable
{
    private readonly StreamWriter? _log;
    private readonly StreamWriter? _scalars;
    private readonly TensorBoardWriter? _tensorBoard;
    private readonly string? _prefix;
    private readonly object _gate = new();
    private bool _closed;

    public string RunDir { get; }
    public string LogPath { get; }
    public string ScalarsPath { get; }
    public Action<string>? Echo { get; set; }
    /// <summary>The TensorBoard events file (report_to: tensorboard), or null.</summary>
    public string? TensorBoardPath => _tensorBoard?.Path;
    public string CurvesPath => RunDir.Length == 0 ? "" : Path.Combine(RunDir, TrainingCurves.FileName);

    public TrainLog(string workDir, string resolvedConfigYaml, DateTime? now = null, bool tensorBoard = false)
    {
        string timestamp = (now ?? DateTime.Now).ToString("yyyyMMdd_HHmmss", CultureInfo.InvariantCulture);
        RunDir = Path.Combine(workDir, timestamp);
        for (int i = 1; Directory.Exists(RunDir); i++) RunDir = Path.Combine(workDir, $"{timestamp}_{i}");
        Directory.CreateDirectory(Path.Combine(RunDir, "vis_data"));
        LogPath = Path.Combine(RunDir, timestamp + ".log");
        ScalarsPath = Path.Combine(RunDir, "vis_data", "scalars.json");
        IO.AtomicFile.WriteAllText(Path.Combine(RunDir, "vis_data", "config.yaml"), resolvedConfigYaml);
        _log = new StreamWriter(LogPath, append: true) { AutoFlush = true };
        _scalars = new StreamWriter(ScalarsPath, append: true) { AutoFlush = true };
        if (tensorBoard) _tensorBoard = TensorBoardWriter.Create(Path.Combine(RunDir, "vis_data"));
    }

    /// <summary>
    /// The log of a data-parallel rank other than 0: no files (rank 0 writes the run folder), and only warnings reach
    /// the console, tagged with the rank, since every rank's output shares one terminal.
    /// </summary>
    private TrainLog(int rank)
    {
        RunDir = LogPath = ScalarsPath = "";
        _prefix = $"[rank {rank}] ";
    }

    public static TrainLog ForOtherRank(int rank, Action<string>? echo) => new(rank) { Echo = echo };

    public void Info(string message) => Write("INFO", message);

    public void Warning(string message) => Write("WARNING", message);

    private void Write(string level, string message)
    {
        if (_prefix is not null && level == "INFO") return;
        string line = $"{_prefix}{DateTime.Now:yyyy/MM/dd HH:mm:ss} - vlmtune - {level} - {message}";
        if (_log is not null) lock (_gate) _log.WriteLine(line);
        Echo?.Invoke(line);
    }

    /// <summary>
    /// <c>Iter(train) [  10/1242]  lr: 5.0002e-06  eta: 3:58:14  time: 11.6030  data_time: 0.0238  memory: 37911  loss: 5.6273</c>
    /// then grad_norm, tokens/s and MFU; and the scalars line.
    /// </summary>
    public void Iteration(IterationStats s)
    {
        int width = s.TotalIters.ToString(CultureInfo.InvariantCulture).Length;
        var ci = CultureInfo.InvariantCulture;
        string line = string.Create(ci,
            $"Iter(train) [{s.Iter.ToString(ci).PadLeft(width)}/{s.TotalIters}]  lr: {s.Lr:0.0000e+00}  eta: {FormatEta(s.Eta)}  " +
            $"time: {s.Time:F4}  data_time: {s.DataTime:F4}  memory: {s.MemoryMb}  loss: {FormatLoss(s.Loss)}  " +
            $"grad_norm: {(s.GradNorm is { } g ? g.ToString("F4", ci) : "-")}  tokens_per_s: {s.TokensPerSecond:F1}  " +
            $"mfu: {(s.Mfu is { } m ? m.ToString("F4", ci) : "-")}");
        Info(line);
        var scalars = new Dictionary<string, object?>
        {
            ["lr"] = s.Lr, ["data_time"] = s.DataTime, ["loss"] = double.IsFinite(s.Loss) ? s.Loss : null, ["time"] = s.Time,
            ["iter"] = s.Iter, ["memory"] = s.MemoryMb, ["step"] = s.Iter, ["grad_norm"] = s.GradNorm,
            ["tokens_per_s"] = s.TokensPerSecond, ["optimizer_step"] = s.OptimizerStep,
        };
        if (_scalars is not null) lock (_gate) _scalars.WriteLine(JsonSerializer.Serialize(scalars));
        _tensorBoard?.Scalars(s.Iter, [("train/loss", s.Loss), ("train/lr", s.Lr), ("train/grad_norm", s.GradNorm ?? double.NaN),
            ("train/tokens_per_s", s.TokensPerSecond)]);
    }

    /// <summary>
    /// An evaluation's loss: the scalars line <c>{"eval_loss": L, "iter": N, "step": N}</c> (no <c>loss</c> key, so
    /// readers tell it from a training line) and <c>eval/loss</c> in TensorBoard.
    /// </summary>
    public void Evaluation(long iter, double evalLoss)
    {
        var scalars = new Dictionary<string, object?> { ["eval_loss"] = double.IsFinite(evalLoss) ? evalLoss : null, ["iter"] = iter, ["step"] = iter };
        if (_scalars is not null) lock (_gate) _scalars.WriteLine(JsonSerializer.Serialize(scalars));
        _tensorBoard?.Scalars(iter, [("eval/loss", evalLoss)]);
    }

    /// <summary>
    /// <c>Iter(val) [  40/1242]  eval_loss: 1.2345  eval_samples: 50  eval_tokens: 1234</c> with a line per answer, the
    /// scalars (above) and the answers as <c>eval/iter_40.json</c> in the run folder (the dashboard shows them).
    /// </summary>
    public void Evaluation(EvalResult r, long totalIters)
    {
        var ci = CultureInfo.InvariantCulture;
        int width = totalIters.ToString(ci).Length;
        Info(string.Create(ci, $"Iter(val) [{r.Iteration.ToString(ci).PadLeft(width)}/{totalIters}]  eval_loss: {FormatLoss(r.Loss)}  eval_samples: {r.Samples}  eval_tokens: {r.Tokens}"));
        foreach (var a in r.Answers)
            Info($"eval sample {a.Index}: {Shorten(a.Question)} → {Shorten(a.Answer)} (reference: {Shorten(a.Reference)})");
        Evaluation(r.Iteration, r.Loss);
        if (_scalars is null) return;
        Directory.CreateDirectory(Path.Combine(RunDir, "eval"));
        VlmTune.IO.AtomicFile.WriteAllText(Path.Combine(RunDir, "eval", $"iter_{r.Iteration}.json"), r.ToJson());
    }

    private static string Shorten(string text)
    {
        var line = text.ReplaceLineEndings(" ");
        return line.Length > 80 ? line[..80] + "…" : line;
    }

    private static string FormatLoss(double loss) => double.IsNaN(loss) ? "skipped" : loss.ToString("F4", CultureInfo.InvariantCulture);

    /// <summary>Python's str(timedelta(seconds=int(eta))): H:MM:SS, with "N days, " in front past a day.</summary>
    public static string FormatEta(double seconds)
    {
        var t = TimeSpan.FromSeconds(Math.Max(0, Math.Floor(double.IsFinite(seconds) ? seconds : 0)));
        string hms = $"{t.Hours}:{t.Minutes:00}:{t.Seconds:00}";
        return t.Days > 0 ? $"{t.Days} day{(t.Days == 1 ? "" : "s")}, {hms}" : hms;
    }

    /// <summary>Closes the files and draws <c>curves.png</c> from what the run logged (nothing when it logged nothing).</summary>
    public void Dispose()
    {
        lock (_gate)
        {
            if (_closed) return;
            _closed = true;
            _scalars?.Dispose();
            _tensorBoard?.Dispose();
        }
        if (_scalars is not null) WriteCurves();
        lock (_gate) _log?.Dispose();
    }

    private void WriteCurves()
    {
        try
        {
            var scalars = RunScalars.ReadLenient(ScalarsPath);
            if (scalars.IsEmpty) return;
            string label = $"{Path.GetFileName(Path.GetDirectoryName(RunDir))}/{Path.GetFileName(RunDir)}";
            TrainingCurves.Write(CurvesPath, [new CurveRun(label, scalars)]);
            Info($"training curves: {CurvesPath}");
        }
        // The curves are a report: whatever stops them (a full disk, a missing native library) must not fail a
        // finished run, whose checkpoint is already saved. The warning itself may fail on a full disk.
        catch (Exception e)
        {
            try { Warning($"training curves not written to {CurvesPath}: {e.Message}"); }
            catch (IOException) { }
        }
    }
}
