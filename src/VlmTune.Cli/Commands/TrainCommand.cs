using System.CommandLine;
using System.Runtime.InteropServices;
using Spectre.Console;
using VlmTune.Training;

namespace VlmTune.Cli.Commands;

/// <summary><c>vlmtune train CONFIG [--set key=value]... [--resume auto|PATH]</c>: fine-tune InternVL2 (full, LoRA, QLoRA).</summary>
internal static class TrainCommand
{
    private static readonly Argument<string> ConfigPath = new("config") { Description = "Training config (YAML); see configs/ and docs/training.md." };
    private static readonly Option<string[]> Set = new("--set")
    {
        Description = "Override a config key: --set key=value (value read as YAML, e.g. --set lr=1e-5 --set data=[a.jsonl,b.jsonl]). Repeatable.",
        AllowMultipleArgumentsPerToken = false,
    };
    private static readonly Option<string?> Resume = new("--resume") { Description = "auto: continue from the latest checkpoint of the work dir; or a checkpoint folder (iter_<n>)." };

    public static Command Create()
    {
        var command = new Command("train", "Fine-tune an InternVL2 model from a YAML config (full, LoRA or QLoRA). Ctrl-C saves a checkpoint.")
        {
            ConfigPath, Set, Resume,
        };
        command.SetAction((parse, ct) => CliErrors.RunAsync(() => Run(parse, ct)));
        return command;
    }

    private static Task<int> Run(ParseResult parse, CancellationToken ct)
    {
        // Validate the whole config before anything heavy starts; every problem is listed.
        var config = TrainConfig.Load(parse.GetValue(ConfigPath)!, parse.GetValue(Set) ?? []);
        string? resume = parse.GetValue(Resume);

        // Ctrl-C (SIGINT) or SIGTERM asks the trainer to stop at the next iteration and save a checkpoint; a second
        // signal is left to its default action (terminate now).
        var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        int signals = 0;
        void OnSignal(PosixSignalContext context)
        {
            if (Interlocked.Increment(ref signals) > 1) return;
            context.Cancel = true;
            Console.Error.WriteLine("stopping: finishing the current iteration and saving a checkpoint (signal again to quit now)");
            stop.Cancel();
        }
        var registrations = new[] { PosixSignalRegistration.Create(PosixSignal.SIGINT, OnSignal), PosixSignalRegistration.Create(PosixSignal.SIGTERM, OnSignal) };

        // Train on a foreground thread: should System.CommandLine return early on the signal, the process still stays
        // alive until this thread has written its checkpoint.
        var done = new TaskCompletionSource<int>();
        var thread = new Thread(() =>
        {
            try { done.SetResult(Train(config, resume, stop.Token)); }
            catch (Exception e) { done.SetException(e); }
            finally
            {
                foreach (var r in registrations) r.Dispose();
                stop.Dispose();
            }
        }) { IsBackground = false, Name = "vlmtune-train" };
        thread.Start();
        return done.Task;
    }

    private static int Train(TrainConfig config, string? resume, CancellationToken ct)
    {
        bool interactive = !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive;
        if (!interactive)
        {
            using var trainer = new Trainer(config, new TrainerOptions { Resume = resume, Echo = Console.WriteLine });
            trainer.Setup();
            return Report(trainer.Train(ct));
        }

        TrainResult? result = null;
        using (var trainer = new Trainer(config, new TrainerOptions { Resume = resume, Echo = line => AnsiConsole.WriteLine(line) }))
        {
            trainer.Setup();
            AnsiConsole.Progress()
                .AutoClear(false)
                .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn(), new SpinnerColumn())
                .Start(ctx =>
                {
                    var task = ctx.AddTask("train", maxValue: trainer.TotalIterations);
                    task.Value = trainer.Iteration;
                    result = trainer.Train(ct, progress: p =>
                    {
                        task.Value = p.Iteration;
                        task.Description = double.IsFinite(p.Loss) ? $"train  loss {p.Loss:F4}  lr {p.Lr:0.000e+00}" : "train";
                    });
                });
        }
        return Report(result!);
    }

    private static int Report(TrainResult result)
    {
        Console.WriteLine(result.Interrupted
            ? result.LastCheckpoint is null
                ? "interrupted before the first optimizer step; nothing to resume"
                : $"interrupted after {result.Iterations} iterations; resume with --resume auto (checkpoint {result.LastCheckpoint})"
            : $"done: {result.Iterations} iterations; checkpoint {result.LastCheckpoint}; logs {result.RunDir}");
        return result.Interrupted ? 130 : 0;
    }
}
