using System.Collections.Concurrent;
using System.CommandLine;
using Spectre.Console;
using VlmTune.Hub;

namespace VlmTune.Cli.Commands;

/// <summary><c>vlmtune download REPO_ID --local-dir DIR</c>: a model folder from Hugging Face or ModelScope.</summary>
internal static class DownloadCommand
{
    public static Command Create()
    {
        var repoId = new Argument<string>("repo-id") { Description = "Repository id, owner/name (e.g. OpenGVLab/InternVL2-2B)." };
        var localDir = new Option<string>("--local-dir") { Description = "Folder to download into (created if missing).", Required = true };
        var revision = new Option<string?>("--revision") { Description = "Branch, tag or commit. [default: main on hf, master on modelscope]" };
        var token = new Option<string?>("--token") { Description = "Access token for private or gated repos. [default: HF_TOKEN, or MODELSCOPE_API_TOKEN]" };
        var endpoint = new Option<string?>("--endpoint") { Description = "Hub URL, e.g. a mirror. [default: HF_ENDPOINT or MODELSCOPE_DOMAIN, else the public hub]" };
        var source = new Option<string>("--source") { Description = "Which hub: hf or modelscope.", DefaultValueFactory = _ => "hf" };
        source.AcceptOnlyFromAmong("hf", "huggingface", "modelscope", "ms");
        var include = new Option<string[]>("--include") { Description = "Glob patterns of files to download, e.g. --include \"*.json\" \"*.safetensors\". [default: all files]", AllowMultipleArgumentsPerToken = true };
        var exclude = new Option<string[]>("--exclude") { Description = "Glob patterns of files to leave out.", AllowMultipleArgumentsPerToken = true };
        var maxWorkers = new Option<int>("--max-workers") { Description = "Files downloaded at the same time.", DefaultValueFactory = _ => 8 };
        var offline = new Option<bool>("--offline") { Description = "Use only files already in --local-dir (also HF_HUB_OFFLINE=1)." };

        var command = new Command("download", "Download a model repository into a local folder, resuming partial files and verifying sha256.")
        {
            repoId, localDir, revision, token, endpoint, source, include, exclude, maxWorkers, offline,
        };
        command.SetAction(parse => CliErrors.Run(() =>
        {
            using var stop = StopSignals.Listen("closing the transfers (partial files stay and a rerun resumes them)");
            return stop.Run(ct => Download(parse, ct).GetAwaiter().GetResult(),
                $"partial files stay in {Path.GetFullPath(parse.GetValue(localDir)!)} and a rerun resumes them");
        }));
        return command;

        async Task<int> Download(ParseResult parse, CancellationToken ct)
        {
            var options = new HubDownloadOptions
            {
                RepoId = parse.GetValue(repoId)!,
                LocalDir = parse.GetValue(localDir)!,
                Source = HubSourceNames.Parse(parse.GetValue(source)!),
                Revision = parse.GetValue(revision),
                Token = parse.GetValue(token),
                Endpoint = parse.GetValue(endpoint),
                Offline = parse.GetValue(offline) ? true : null,
                MaxParallelFiles = parse.GetValue(maxWorkers),
                Include = parse.GetValue(include),
                Exclude = parse.GetValue(exclude),
            };
            var result = await RunWithProgressAsync(options, ct);
            var upToDate = result.Files.Count - result.DownloadedCount;
            Console.WriteLine(
                $"{result.RepoId} ({result.Commit}): {result.Files.Count} files, {Size(result.TotalBytes)} in {result.LocalDir} " +
                $"({result.DownloadedCount} downloaded, {upToDate} already up to date).");
            return 0;
        }
    }

    private static Task<HubDownloadResult> RunWithProgressAsync(HubDownloadOptions options, CancellationToken ct)
    {
        if (Console.IsOutputRedirected || !AnsiConsole.Profile.Capabilities.Interactive)
            return HubDownloader.DownloadAsync(options, new PlainProgress(), ct);
        return AnsiConsole.Progress()
            .AutoClear(false)
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(),
                new DownloadedColumn(), new TransferSpeedColumn(), new RemainingTimeColumn())
            .StartAsync(ctx => HubDownloader.DownloadAsync(options, new BarProgress(ctx), ct));
    }

    /// <summary>One line per event that matters, for logs and pipes; big files also every 10%.</summary>
    private sealed class PlainProgress : IProgress<HubDownloadProgress>
    {
        private const long BigFile = 16L << 20;
        private readonly ConcurrentDictionary<string, long> _tenths = new();

        public void Report(HubDownloadProgress p)
        {
            var line = p.Status switch
            {
                HubFileStatus.WaitingForLock => $"waiting: {p.Path} is being downloaded by another process",
                // The first event of each transfer attempt has BytesDone == ResumedFrom.
                HubFileStatus.Downloading when p.BytesDone == p.ResumedFrom => p.ResumedFrom > 0
                    ? $"resuming {p.Path} at {Size(p.ResumedFrom)} of {Size(p.TotalBytes)}"
                    : $"downloading {p.Path} ({Size(p.TotalBytes)})",
                HubFileStatus.Downloading when p.TotalBytes >= BigFile && NewTenth(p) is { } tenth =>
                    $"{p.Path}: {tenth * 10}% ({Size(p.BytesDone)} of {Size(p.TotalBytes)})",
                HubFileStatus.Retrying => $"retrying {p.Path}: {p.Message}",
                HubFileStatus.Done => $"done {p.Path} ({Size(p.TotalBytes)})",
                HubFileStatus.UpToDate => $"up to date {p.Path}",
                _ => null,
            };
            if (line is not null) Console.WriteLine(line);
        }

        private long? NewTenth(HubDownloadProgress p)
        {
            var tenth = p.BytesDone * 10 / p.TotalBytes!.Value;
            var previous = _tenths.GetOrAdd(p.Path, tenth); // the first event sets the baseline (a resume starts midway)
            if (tenth <= previous || tenth >= 10) return null;
            return _tenths.TryUpdate(p.Path, tenth, previous) ? tenth : null;
        }
    }

    /// <summary>A Spectre.Console bar per file.</summary>
    private sealed class BarProgress(ProgressContext ctx) : IProgress<HubDownloadProgress>
    {
        private readonly ConcurrentDictionary<string, ProgressTask> _tasks = new();

        public void Report(HubDownloadProgress p)
        {
            var name = Markup.Escape(p.Path);
            var task = _tasks.GetOrAdd(p.Path, _ => ctx.AddTask(name, autoStart: false, maxValue: Math.Max(1, p.TotalBytes ?? 1)));
            if (p.TotalBytes is > 0 && Math.Abs(task.MaxValue - p.TotalBytes.Value) > 0.5) task.MaxValue = p.TotalBytes.Value;
            switch (p.Status)
            {
                case HubFileStatus.WaitingForLock:
                    task.Description = $"{name} [grey](another process is downloading it)[/]";
                    break;
                case HubFileStatus.Downloading:
                    if (!task.IsStarted) task.StartTask();
                    task.Description = name;
                    task.Value = p.BytesDone;
                    break;
                case HubFileStatus.Retrying:
                    task.Description = $"{name} [yellow]({Markup.Escape(p.Message ?? "retrying")})[/]";
                    break;
                case HubFileStatus.Done or HubFileStatus.UpToDate:
                    if (!task.IsStarted) task.StartTask();
                    task.Description = p.Status == HubFileStatus.UpToDate ? $"{name} [grey](up to date)[/]" : name;
                    task.Value = task.MaxValue;
                    task.StopTask();
                    break;
                case HubFileStatus.Failed:
                    task.Description = $"[red]{name} (failed)[/]";
                    task.StopTask();
                    break;
            }
        }
    }

    private static string Size(long? bytes) => bytes switch
    {
        null => "size unknown",
        < 1024 => $"{bytes} B",
        < 1024 * 1024 => $"{bytes / 1024.0:0.0} KiB",
        < 1024L * 1024 * 1024 => $"{bytes / (1024.0 * 1024):0.0} MiB",
        _ => $"{bytes / (1024.0 * 1024 * 1024):0.00} GiB",
    };
}
