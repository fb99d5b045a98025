using System.Net;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using VlmTune.Training.Reports;

namespace VlmTune.Serving;

/// <summary>
/// <c>vlmtune dashboard</c>'s host: one static page and a JSON API over the run folders under a root (a run folder, a
/// work dir, or a folder of work dirs), read afresh on every request so the page follows runs as they write. Loopback
/// unless told otherwise. Runs are addressed by their id from <see cref="RunFolders.Find"/> and evaluation images by
/// their place in an evaluation file, so no request names a path: nothing outside the runs can be reached.
/// </summary>
public static class DashboardServer
{
    /// <summary>Builds (does not start) the app over <paramref name="root"/>.</summary>
    public static WebApplication Build(string root, string host = "127.0.0.1", int port = 0)
    {
        var dashboard = new Dashboard(Path.GetFullPath(root));
        RunFolders.Find(dashboard.Root);   // a missing root fails here, not on the first request
        return LocalPageHost.Build(host, port, app => app.MapDashboardApi(dashboard));
    }

    private static IEndpointRouteBuilder MapDashboardApi(this IEndpointRouteBuilder app, Dashboard dashboard)
    {
        app.MapGet("/", (HttpContext context) => LocalPageHost.Page(context, Page.Value));
        app.MapGet("/api/runs", () => TypedResults.Ok(new { root = dashboard.Root, runs = RunFolders.Find(dashboard.Root).Select(dashboard.Summary).ToList() }));
        app.MapGet("/api/scalars", (string run) =>
        {
            var scalars = dashboard.Scalars(dashboard.Run(run));
            return TypedResults.Ok(new
            {
                lines = scalars.Lines, problem = scalars.Problem,
                train = scalars.Train.Select(p => new { iter = p.Iter, loss = p.Loss, lr = p.Lr, grad_norm = p.GradNorm, tokens_per_s = p.TokensPerSecond, time = p.Time, memory = p.Memory }),
                eval = scalars.Eval.Select(e => new { iter = e.Iter, eval_loss = e.EvalLoss }),
            });
        });
        app.MapGet("/api/config", (string run) =>
        {
            var folder = dashboard.Run(run);
            if (!File.Exists(folder.ConfigPath)) throw new KeyNotFoundException($"run {run} has no vis_data/config.yaml");
            return TypedResults.Ok(new { path = folder.ConfigPath, yaml = File.ReadAllText(folder.ConfigPath) });
        });
        app.MapGet("/api/evals", (string run) => TypedResults.Ok(RunFolders.Evals(dashboard.Run(run))
            .Select(e => new { iter = e.Iter, eval_loss = e.EvalLoss, answers = e.Answers.Count })));
        app.MapGet("/api/eval", (string run, long iter) =>
        {
            var folder = dashboard.Run(run);
            var eval = RunFolders.Eval(folder, iter) ?? throw new KeyNotFoundException($"run {run} has no evaluation at iteration {iter}");
            return TypedResults.Ok(new
            {
                iter = eval.Iter, eval_loss = eval.EvalLoss,
                answers = eval.Answers.Select((a, position) => new
                {
                    index = a.Index, question = a.Question, reference = a.Reference, answer = a.Answer,
                    images = a.Images.Select((_, k) => $"/api/eval-image?run={Uri.EscapeDataString(run)}&iter={iter}&answer={position}&image={k}").ToList(),
                }),
            });
        });
        app.MapGet("/api/eval-image", (string run, long iter, int answer, int image) =>
        {
            var folder = dashboard.Run(run);
            var eval = RunFolders.Eval(folder, iter) ?? throw new KeyNotFoundException($"run {run} has no evaluation at iteration {iter}");
            if (answer < 0 || answer >= eval.Answers.Count || image < 0 || image >= eval.Answers[answer].Images.Count)
                throw new KeyNotFoundException($"evaluation {iter} of run {run} has no image {image} in answer {answer}");
            string path = Path.GetFullPath(eval.Answers[answer].Images[image], folder.Dir);
            var type = ImageType(path) ?? throw new KeyNotFoundException($"evaluation {iter} of run {run}: image {image} of answer {answer} is not a readable image file");
            return Results.File(path, type);
        });
        app.MapGet("/api/curves.png", (string[] run, int? width, int? height) =>
        {
            if (run.Length == 0) throw new VlmTuneException("name at least one run (?run=ID)");
            int w = Math.Clamp(width ?? TrainingCurves.DefaultWidth, 400, 4000), h = Math.Clamp(height ?? TrainingCurves.DefaultHeight, 300, 4000);
            return TypedResults.Bytes(dashboard.Curves(run.Distinct().Select(dashboard.Run).ToList(), w, h), "image/png");
        });
        return app;
    }

    /// <summary>The content type of an image file judged by its first bytes (never by its name alone), or null for anything else.</summary>
    internal static string? ImageType(string path)
    {
        Span<byte> head = stackalloc byte[12];
        int n;
        try
        {
            if (!File.Exists(path)) return null;
            using var file = File.OpenRead(path);
            n = file.ReadAtLeast(head, head.Length, throwOnEndOfStream: false);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return null; }
        head = head[..n];
        if (head.StartsWith((ReadOnlySpan<byte>)[0xFF, 0xD8, 0xFF])) return "image/jpeg";
        if (head.StartsWith((ReadOnlySpan<byte>)[0x89, (byte)'P', (byte)'N', (byte)'G'])) return "image/png";
        if (head.StartsWith("GIF8"u8)) return "image/gif";
        if (head.Length >= 12 && head.StartsWith("RIFF"u8) && head[8..12].SequenceEqual("WEBP"u8)) return "image/webp";
        if (head.StartsWith("BM"u8)) return "image/bmp";
        return null;
    }

    private static readonly Lazy<byte[]> Page = new(() =>
    {
        using var stream = typeof(DashboardServer).Assembly.GetManifestResourceStream("VlmTune.Serving.dashboard.html")
            ?? throw new InvalidOperationException("The dashboard page resource is missing from the assembly.");
        using var copy = new MemoryStream();
        stream.CopyTo(copy);
        return copy.ToArray();
    });

    /// <summary>The root and the caches: parsed scalars and log progress per file version, rendered curves per set of versions.</summary>
    private sealed class Dashboard(string root)
    {
        private readonly Dictionary<string, (string Version, RunScalars Scalars)> _scalars = new(StringComparer.Ordinal);
        private readonly Dictionary<string, (string Version, RunProgress Progress)> _progress = new(StringComparer.Ordinal);
        private readonly Dictionary<string, byte[]> _curves = new(StringComparer.Ordinal);
        private readonly Queue<string> _curveKeys = new();
        private readonly object _gate = new();
        private readonly SemaphoreSlim _render = new(1, 1);

        public string Root { get; } = root;

        public RunFolder Run(string id) =>
            RunFolders.Find(Root).FirstOrDefault(r => r.Id == id) ?? throw new KeyNotFoundException($"there is no run '{ModelsApi.Clip(id)}' under {Root}");

        /// <summary>Length and modification time of scalars.json: it changes whenever a line is appended.</summary>
        private static string Version(RunFolder run)
        {
            var info = new FileInfo(run.ScalarsPath);
            return info.Exists ? $"{info.Length}-{info.LastWriteTimeUtc.Ticks}" : "0";
        }

        public RunScalars Scalars(RunFolder run)
        {
            string version = Version(run);
            lock (_gate)
                if (_scalars.TryGetValue(run.Dir, out var cached) && cached.Version == version) return cached.Scalars;
            var scalars = RunScalars.ReadLenient(run.ScalarsPath);
            lock (_gate) _scalars[run.Dir] = (version, scalars);
            return scalars;
        }

        /// <summary>The log's progress, read again only when the log has grown (every open page polls every run).</summary>
        private RunProgress Progress(RunFolder run)
        {
            string? log = run.LogPath;
            var info = log is null ? null : new FileInfo(log);
            string version = info is { Exists: true } ? $"{log}\t{info.Length}-{info.LastWriteTimeUtc.Ticks}" : "";
            lock (_gate)
                if (_progress.TryGetValue(run.Dir, out var cached) && cached.Version == version) return cached.Progress;
            var progress = RunFolders.Progress(log);
            lock (_gate) _progress[run.Dir] = (version, progress);
            return progress;
        }

        public object Summary(RunFolder run)
        {
            var scalars = Scalars(run);
            var progress = Progress(run);
            var latest = scalars.Train.Count > 0 ? scalars.Train[^1] : null;
            var bestEval = scalars.Eval.Count > 0 ? scalars.Eval.MinBy(e => e.EvalLoss) : null;
            return new
            {
                id = run.Id, label = run.Label, dir = run.Dir, version = Version(run),
                state = progress.State, iter = progress.Iter ?? latest?.Iter, total = progress.TotalIters, eta = progress.Eta,
                last_line = progress.LastLine, modified = File.Exists(run.ScalarsPath) ? File.GetLastWriteTimeUtc(run.ScalarsPath) : (DateTime?)null,
                points = scalars.Train.Count, problem = scalars.Problem,
                latest = latest is null ? null : new { iter = latest.Iter, loss = latest.Loss, lr = latest.Lr, grad_norm = latest.GradNorm, tokens_per_s = latest.TokensPerSecond, memory = latest.Memory },
                last_eval = scalars.Eval.Count > 0 ? new { iter = scalars.Eval[^1].Iter, eval_loss = scalars.Eval[^1].EvalLoss } : null,
                best_eval = bestEval is null ? null : new { iter = bestEval.Iter, eval_loss = bestEval.EvalLoss },
                eval_files = RunFolders.EvalIters(run),
                checkpoints = RunFolders.Checkpoints(run.WorkDir).Select(c => new { name = c.Name, iter = c.Iter, bytes = c.Bytes, modified = c.Modified }),
            };
        }

        /// <summary>The PNG of these runs (one render at a time; the last few kept, since every open page asks for the same).</summary>
        public byte[] Curves(IReadOnlyList<RunFolder> runs, int width, int height)
        {
            string key = string.Join("\n", runs.Select(r => $"{r.Id}\t{Version(r)}")) + $"\n{width}x{height}";
            lock (_gate) if (_curves.TryGetValue(key, out var png)) return png;
            _render.Wait();
            try
            {
                lock (_gate) if (_curves.TryGetValue(key, out var png)) return png;
                var image = TrainingCurves.Render(runs.Select(r => new CurveRun(r.Label, Scalars(r))).ToList(), width, height);
                lock (_gate)
                {
                    _curves[key] = image.Png;
                    _curveKeys.Enqueue(key);
                    while (_curveKeys.Count > 8) _curves.Remove(_curveKeys.Dequeue());
                }
                return image.Png;
            }
            finally { _render.Release(); }
        }
    }
}
