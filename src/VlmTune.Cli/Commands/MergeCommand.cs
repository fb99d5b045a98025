using System.CommandLine;
using Spectre.Console;
using VlmTune.Checkpoints;
using VlmTune.Models;

namespace VlmTune.Cli.Commands;

/// <summary><c>vlmtune merge --base DIR --adapter CKPT_DIR --out DIR [--layout official|hf]</c>: fold a fine-tuned adapter into a model folder.</summary>
internal static class MergeCommand
{
    private static readonly Option<string> Base = new("--base") { Description = "Base InternVL2 model folder the adapter was trained on.", Required = true };
    private static readonly Option<string> Adapter = new("--adapter") { Description = "Training checkpoint (iter_<n>/ or its work dir) or PEFT LoRA adapter folder (LLM and/or vision).", Required = true };
    private static readonly Option<string> Out = new("--out") { Description = "Folder for the merged model (must not exist, or be empty, unless --force).", Required = true };
    private static readonly Option<string?> DType = new("--dtype") { Description = $"{TensorPlacement.DTypeNames}. [default: the base's stored dtype of each tensor]" };
    private static readonly Option<bool> Force = new("--force") { Description = "Replace a non-empty --out folder." };
    private static readonly Option<bool> NoVerify = new("--no-verify") { Description = "Skip reloading the output and comparing its logits with base + adapter." };
    private static readonly Option<bool> MergeIntoNf4 = new("--merge-into-nf4") { Description = "QLoRA: merge into the NF4-dequantised LLM weights the adapter was trained on, instead of the original ones." };
    private static readonly Option<string> MaxShardSize = new("--max-shard-size") { Description = "Largest weight file (e.g. 5GB, 500MB, or bytes).", DefaultValueFactory = _ => "5GB" };
    private static readonly Option<string> Device = new("--device") { Description = $"Device for the verification: {TensorPlacement.DeviceNames}.", DefaultValueFactory = _ => "cpu" };
    private static readonly Option<string> Layout = new("--layout") { Description = "official (InternVLChatModel, remote code) or hf (transformers' InternVLForConditionalGeneration).", DefaultValueFactory = _ => "official" };

    public static Command Create(RuntimeSwitches switches)
    {
        var command = new Command("merge", "Merge a fine-tuned adapter into its base model: a model folder every tool loads (official InternVL layout, or transformers' with --layout hf).")
        {
            Base, Adapter, Out, DType, Force, NoVerify, MergeIntoNf4, MaxShardSize, Device, Layout,
        };
        command.SetAction(parse => CliErrors.Run(() =>
        {
            using var stop = StopSignals.Listen("finishing the current tensor, then removing the temporary folder");
            return stop.Run(ct => Run(parse, switches, ct), $"the temporary folder was removed; nothing was written to {Path.GetFullPath(parse.GetValue(Out)!)}");
        }));
        return command;
    }

    private static int Run(ParseResult parse, RuntimeSwitches switches, CancellationToken ct)
    {
        var dtype = TensorPlacement.ParseDType(parse.GetValue(DType));
        var options = new MergeOptions
        {
            BaseDir = parse.GetValue(Base)!, AdapterDir = parse.GetValue(Adapter)!, OutDir = parse.GetValue(Out)!,
            DType = dtype, Force = parse.GetValue(Force), MergeIntoNf4 = parse.GetValue(MergeIntoNf4),
            MaxShardBytes = ModelMerger.ParseSize(parse.GetValue(MaxShardSize)!),
            Layout = ParseLayout(parse.GetValue(Layout)!),
            Verify = parse.GetValue(NoVerify) ? null : new MergeVerifyOptions { Device = parse.GetValue(Device)! },
            TestPause = switches.TestPause,
        };

        MergeResult result;
        bool interactive = !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive;
        if (interactive)
        {
            MergeResult? done = null;
            AnsiConsole.Progress()
                .AutoClear(false)
                .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn(), new SpinnerColumn())
                .Start(ctx =>
                {
                    var task = ctx.AddTask("merge", maxValue: 1);
                    done = ModelMerger.Merge(options with
                    {
                        Log = line => AnsiConsole.WriteLine(line),
                        Progress = p =>
                        {
                            task.MaxValue = p.Total;
                            task.Value = p.Done;
                            task.Description = Markup.Escape($"merge {p.Tensor}");
                            if (p.Done == p.Total) task.Description = "merge";
                        },
                    }, ct);
                });
            result = done!;
        }
        else
        {
            // Piped output: a line per tenth of the tensors instead of a bar.
            int lastTenth = -1;
            result = ModelMerger.Merge(options with
            {
                Log = Console.WriteLine,
                Progress = p =>
                {
                    int tenth = p.Done * 10 / p.Total;
                    if (tenth != lastTenth) { lastTenth = tenth; Console.WriteLine($"merge: {p.Done}/{p.Total} tensors ({p.Tensor})"); }
                },
            }, ct);
        }
        Console.WriteLine($"merged model written to {result.OutDir}" + (result.Verify is { } v ? $" (verified: max |logit difference| {v.MaxAbsDiff:g3})" : " (not verified)"));
        return 0;
    }

    internal static CheckpointLayout ParseLayout(string text) => text.Trim().ToLowerInvariant() switch
    {
        "official" => CheckpointLayout.Official,
        "hf" => CheckpointLayout.Hf,
        _ => throw new VlmTune.VlmTuneException($"--layout '{text}' is not a layout (official or hf)."),
    };
}
