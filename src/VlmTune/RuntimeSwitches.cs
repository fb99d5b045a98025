using System.Collections;
using System.Globalization;
using VlmTune.Diagnostics;
using VlmTune.Inference;

namespace VlmTune;

/// <summary>
/// The <c>VLMTUNE_*</c> environment switches (docs/runtime-switches.md), in one place: the entry point reads them once
/// (<see cref="FromEnvironment()"/>, the CLI at start-up) and passes them down in the options of the code that uses
/// them (<see cref="EngineOptions"/>, <see cref="ChatLoadOptions"/>, <c>TrainerOptions</c>, <c>MergeOptions</c>,
/// <c>OogiriOptions</c>). Nothing else reads them, so a library caller that passes none gets <see cref="Defaults"/>
/// whatever the environment holds, and a test passes the value it wants instead of setting process state.
/// </summary>
public sealed record RuntimeSwitches
{
    public const string FusedDecodeVariable = "VLMTUNE_FUSED_DECODE";
    public const string FusedMmaVariable = "VLMTUNE_FUSED_MMA";
    public const string FusedGemvUnrollVariable = "VLMTUNE_FUSED_GEMV_UNROLL";
    public const string FusedMmaUnrollVariable = "VLMTUNE_FUSED_MMA_UNROLL";
    public const string FusedSkipVariable = "VLMTUNE_FUSED_SKIP";
    public const string CudaGraphsVariable = "VLMTUNE_CUDA_GRAPHS";
    public const string Nf4KernelVariable = "VLMTUNE_NF4_KERNEL";
    public const string FusedAdamWVariable = "VLMTUNE_FUSED_ADAMW";
    public const string CudnnAttentionVariable = "VLMTUNE_CUDNN_ATTENTION";
    public const string GpuIsolatedVariable = "VLMTUNE_GPU_ISOLATED";
    public const string MemoryTraceVariable = "VLMTUNE_MEMORY_TRACE";
    public const string TestFaultVariable = "VLMTUNE_TEST_FAULT";
    public const string TestPauseVariable = "VLMTUNE_TEST_PAUSE";

    /// <summary>Every switch at its default: what the code does with none of the variables set.</summary>
    public static RuntimeSwitches Defaults { get; } = new();

    /// <summary>VLMTUNE_FUSED_DECODE: decode steps on CUDA run the fused kernels where the model allows (false: TorchSharp ops only).</summary>
    public bool FusedDecode { get; init; } = true;

    /// <summary>
    /// VLMTUNE_FUSED_MMA, _GEMV_UNROLL, _MMA_UNROLL, _SKIP: the fused kernels' diagnostics for tuning and timing runs;
    /// VLMTUNE_CUDA_GRAPHS=1: fused decode steps replay as CUDA graphs (off by default).
    /// </summary>
    public FusedDecodeTuning FusedTuning { get; init; } = FusedDecodeTuning.Default;

    /// <summary>VLMTUNE_NF4_KERNEL: NF4 weights dequantise on CUDA with our kernel (false: tensor ops).</summary>
    public bool Nf4Kernel { get; init; } = true;

    /// <summary>VLMTUNE_FUSED_ADAMW: the optimizer step on CUDA runs the multi-tensor kernels (false: TorchSharp's AdamW per tensor).</summary>
    public bool FusedAdamW { get; init; } = true;

    /// <summary>
    /// VLMTUNE_CUDNN_ATTENTION: whether PyTorch's attention may prefer cuDNN on Hopper and Blackwell, as libtorch does by
    /// default (false: flash / memory-efficient first). Null: the workload's own default
    /// (<see cref="Cuda.AttentionBackends.ForServing"/>, <see cref="Cuda.AttentionBackends.ForTraining"/>).
    /// </summary>
    public bool? CudnnAttention { get; init; }

    /// <summary>VLMTUNE_GPU_ISOLATED: the launcher already left this rank one GPU in CUDA_VISIBLE_DEVICES.</summary>
    public bool GpuIsolated { get; init; }

    /// <summary>VLMTUNE_MEMORY_TRACE: the 1-based training iteration whose GPU memory is traced phase by phase; null: none.</summary>
    public long? MemoryTraceIteration { get; init; }

    /// <summary>VLMTUNE_TEST_FAULT (test aid): a rank that dies or hangs at an iteration; null: none.</summary>
    public InjectedFault? TestFault { get; init; }

    /// <summary>VLMTUNE_TEST_PAUSE (test aid): the point (<see cref="Diagnostics.TestPause.Points"/>) to pause at; null: none.</summary>
    public string? TestPause { get; init; }

    public static RuntimeSwitches FromEnvironment() => FromEnvironment(Environment.GetEnvironmentVariables());

    /// <summary>
    /// Parses the switches of <paramref name="environment"/> (unset or empty: the default). Every bad value is reported
    /// at once, in one line naming each variable and the values it accepts.
    /// </summary>
    public static RuntimeSwitches FromEnvironment(IDictionary environment)
    {
        var problems = new List<string>();
        string? Get(string name) => environment.Contains(name) && environment[name] is string s && s.Trim().Length > 0 ? s.Trim() : null;

        bool Switch(string name, bool fallback)
        {
            if (Get(name) is not { } raw) return fallback;
            switch (raw.ToLowerInvariant())
            {
                case "1" or "true" or "on" or "yes": return true;
                case "0" or "false" or "off" or "no": return false;
                default:
                    problems.Add($"{name}='{raw}' is not a switch value (accepted: 1, true, on, yes / 0, false, off, no).");
                    return fallback;
            }
        }

        long? Positive(string name, string what, long max)
        {
            if (Get(name) is not { } raw) return null;
            if (long.TryParse(raw, NumberStyles.None, CultureInfo.InvariantCulture, out var v) && v >= 1 && v <= max) return v;
            problems.Add($"{name}='{raw}' is not {what} (accepted: an integer ≥ 1).");
            return null;
        }

        // In the order of the table in docs/runtime-switches.md, so the problems read in that order.
        bool fusedDecode = Switch(FusedDecodeVariable, true);
        bool tensorCores = Switch(FusedMmaVariable, true);
        var gemvUnroll = (int?)Positive(FusedGemvUnrollVariable, "an unroll factor", int.MaxValue);
        var mmaUnroll = (int?)Positive(FusedMmaUnrollVariable, "an unroll factor", int.MaxValue);
        var skip = FusedKernels.None;
        if (Get(FusedSkipVariable) is { } skipped)
            foreach (var name in skipped.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
            {
                if (FusedDecodeTuning.SkipNames.TryGetValue(name.ToLowerInvariant(), out var group)) skip |= group;
                else problems.Add($"{FusedSkipVariable}='{skipped}' names '{name}', not a kernel group (accepted: a comma-separated list of {string.Join(", ", FusedDecodeTuning.SkipNames.Keys)}).");
            }
        bool graphs = Switch(CudaGraphsVariable, false);
        bool nf4Kernel = Switch(Nf4KernelVariable, true);
        bool fusedAdamW = Switch(FusedAdamWVariable, true);
        bool? cudnnAttention = Get(CudnnAttentionVariable) is null ? null : Switch(CudnnAttentionVariable, false);
        bool gpuIsolated = Switch(GpuIsolatedVariable, false);
        long? traced = Positive(MemoryTraceVariable, "an iteration number", long.MaxValue);
        InjectedFault? fault = null;
        if (Get(TestFaultVariable) is { } rawFault && (fault = InjectedFault.Parse(rawFault)) is null)
            problems.Add($"{TestFaultVariable}='{rawFault}' is not a fault (accepted: exit:RANK:ITERATION or hang:RANK:ITERATION, e.g. exit:1:3).");
        string? pause = Get(TestPauseVariable);
        if (pause is not null && !Diagnostics.TestPause.Points.Contains(pause))
            problems.Add($"{TestPauseVariable}='{pause}' is not a pause point (accepted: {string.Join(", ", Diagnostics.TestPause.Points)}).");

        if (problems.Count > 0) throw new VlmTuneException(string.Join(" ", problems));
        return new RuntimeSwitches
        {
            FusedDecode = fusedDecode,
            FusedTuning = new FusedDecodeTuning { TensorCores = tensorCores, GemvUnroll = gemvUnroll, MmaUnroll = mmaUnroll, Skip = skip, Graphs = graphs },
            Nf4Kernel = nf4Kernel,
            FusedAdamW = fusedAdamW,
            CudnnAttention = cudnnAttention,
            GpuIsolated = gpuIsolated,
            MemoryTraceIteration = traced,
            TestFault = fault,
            TestPause = pause,
        };
    }
}
