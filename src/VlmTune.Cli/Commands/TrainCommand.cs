using System.CommandLine;
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
    private static readonly Option<int?> NprocPerNode = new("--nproc-per-node")
    {
        Description = "Data-parallel processes (GPUs) on this node; across nodes set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as for torchrun. [default: NPROC_PER_NODE, else 1]",
    };
    private static readonly Option<int?> Zero = new("--zero") { Description = "ZeRO stage: 1 shards the optimizer state over the processes (same as --set zero_stage=1)." };

    public static Command Create(RuntimeSwitches switches)
    {
        var command = new Command("train", "Fine-tune an InternVL2 model from a YAML config (full, LoRA or QLoRA). Ctrl-C saves a checkpoint.")
        {
            ConfigPath, Set, Resume, NprocPerNode, Zero,
        };
        command.SetAction(parse => CliErrors.Run(() => Run(parse, switches)));
        return command;
    }

    private static int Run(ParseResult parse, RuntimeSwitches switches)
    {
        Cuda.AttentionBackends.ForTraining(switches);
        // Validate the whole config before anything heavy starts; every problem is listed.
        var overrides = (parse.GetValue(Set) ?? []).ToList();
        if (parse.GetValue(Zero) is { } zero) overrides.Add($"zero_stage={zero}");
        var config = TrainConfig.Load(parse.GetValue(ConfigPath)!, overrides);
        string? resume = parse.GetValue(Resume);

        // Not started as a rank (torchrun / Slurm / our own launcher set their variables) but asked for several
        // processes: become the launcher. The config was checked once, here, before any rank starts.
        var env = VlmTune.Distributed.DistributedEnvironment.FromProcess();
        int nproc = parse.GetValue(NprocPerNode) ?? NprocFromEnvironment();
        if (nproc < 1) throw new VlmTune.VlmTuneException($"--nproc-per-node must be at least 1 (got {nproc})");
        if (nproc > 1 && !env.StartedByLauncher)
            return VlmTune.Distributed.Launcher.Run(nproc, Environment.GetCommandLineArgs()[1..], line => Console.Error.WriteLine(line));

        // Ctrl-C (SIGINT) or SIGTERM asks the trainer to stop at the next iteration and save a checkpoint (exit code
        // 130, as Launcher expects of its ranks); a second signal quits at once.
        using var stop = StopSignals.Listen("finishing the current iteration and saving a checkpoint");
        return Train(config, new TrainerOptions { Resume = resume, Switches = switches, Distributed = env }, stop.Token);
    }

    private static int NprocFromEnvironment()
    {
        var raw = Environment.GetEnvironmentVariable("NPROC_PER_NODE");
        if (string.IsNullOrWhiteSpace(raw)) return 1;
        return int.TryParse(raw, out var n) && n >= 1 ? n : throw new VlmTune.VlmTuneException($"NPROC_PER_NODE='{raw}' is not a positive integer");
    }

    private static int Train(TrainConfig config, TrainerOptions options, CancellationToken ct)
    {
        var env = options.Distributed ?? VlmTune.Distributed.DistributedEnvironment.Single;
        // One progress bar for a data-parallel job: rank 0's; the other ranks print only warnings and errors.
        bool interactive = env.IsMaster && !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive;
        if (!interactive)
        {
            using var trainer = new Trainer(config, options with { Echo = Console.WriteLine });
            trainer.Setup();
            return Report(trainer.Train(ct), env);
        }

        TrainResult? result = null;
        using (var trainer = new Trainer(config, options with { Echo = line => AnsiConsole.WriteLine(line) }))
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
        return Report(result!, env);
    }

    private static int Report(TrainResult result, VlmTune.Distributed.DistributedEnvironment env)
    {
        if (!env.IsMaster) return result.Interrupted ? 130 : 0;   // rank 0 reports
        Console.WriteLine(result.Interrupted
            ? result.LastCheckpoint is null
                ? "interrupted before the first optimizer step; nothing to resume"
                : $"interrupted after {result.Iterations} iterations; resume with --resume auto (checkpoint {result.LastCheckpoint})"
            : $"done: {result.Iterations} iterations; checkpoint {result.LastCheckpoint}; logs {result.RunDir}");
        return result.Interrupted ? 130 : 0;
    }
}
