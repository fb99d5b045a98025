using System.Globalization;
using System.Text.Json;

namespace VlmTune.Training;

/// <summary>One logged iteration: what goes on the log line and into vis_data/scalars.json.</summary>
public sealed record IterationStats(
    long Iter, long TotalIters, double Lr, double Eta, double Time, double DataTime, long MemoryMb, double Loss,
    double? GradNorm, double TokensPerSecond, double? Mfu, long OptimizerStep);

/// <summary>
/// The run folder <c>work_dirs/&lt;name&gt;/&lt;YYYYMMDD_HHMMSS&gt;/</c> as mmengine lays it out: <c>&lt;timestamp&gt;.log</c> with
/// mmengine-format lines, <c>vis_data/scalars.json</c> (one JSON object per logged iteration) and
/// <c>vis_data/config.yaml</c> (the resolved config). Every line also goes to <see cref="Echo"/>.
/// </summary>
public sealed class TrainLog : IDisposable
{
    private readonly StreamWriter? _log;
    private readonly StreamWriter? _scalars;
    private readonly string? _prefix;
    private readonly object _gate = new();

    public string RunDir { get; }
    public string LogPath { get; }
    public string ScalarsPath { get; }
    public Action<string>? Echo { get; set; }

    public TrainLog(string workDir, string resolvedConfigYaml, DateTime? now = null)
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
    }

    private static string FormatLoss(double loss) => double.IsNaN(loss) ? "skipped" : loss.ToString("F4", CultureInfo.InvariantCulture);

    /// <summary>Python's str(timedelta(seconds=int(eta))): H:MM:SS, with "N days, " in front past a day.</summary>
    public static string FormatEta(double seconds)
    {
        var t = TimeSpan.FromSeconds(Math.Max(0, Math.Floor(double.IsFinite(seconds) ? seconds : 0)));
        string hms = $"{t.Hours}:{t.Minutes:00}:{t.Seconds:00}";
        return t.Days > 0 ? $"{t.Days} day{(t.Days == 1 ? "" : "s")}, {hms}" : hms;
    }

    public void Dispose()
    {
        lock (_gate) { _log?.Dispose(); _scalars?.Dispose(); }
    }
}
