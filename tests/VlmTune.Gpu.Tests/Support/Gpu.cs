using System.Runtime.CompilerServices;
using static TorchSharp.torch;

// One GPU: tests that run side by side would only compete for it, and the decoder tests switch a process-wide option.
[assembly: Xunit.v3.Parallelization(Mode = Xunit.Sdk.ParallelMode.None)]

namespace VlmTune.Gpu.Tests.Support;

/// <summary>Whether this process can run the GPU tests, and why not.</summary>
public static class TestDevice
{
    private static readonly Lazy<string?> MissingLazy = new(() =>
    {
        try
        {
            return cuda.is_available() ? null
                : "CUDA is not available (no NVIDIA GPU, or TorchSharp runs on the CPU-only libtorch): "
                  + "run these on a GPU machine with tools/run_gpu_tests.sh (docs/performance.md, GPU tests)";
        }
        // A libtorch that does not load is a broken setup, not a machine without a GPU: run, so the tests say so.
        catch (Exception) { return null; }
    });

    /// <summary>Why the GPU tests skip here; null where CUDA is available. CI=true changes nothing: CI has no GPU.</summary>
    public static string? Missing => MissingLazy.Value;

    public static Device Cuda => CUDA;
}

/// <summary>A fact that needs CUDA: skipped, with the reason, where it is absent (CI included).</summary>
public sealed class GpuFactAttribute : FactAttribute
{
    public GpuFactAttribute([CallerFilePath] string? sourceFilePath = null, [CallerLineNumber] int sourceLineNumber = -1)
        : base(sourceFilePath, sourceLineNumber)
    {
        if (TestDevice.Missing is { } reason) Skip = reason;
    }
}

/// <summary>A theory that needs CUDA; see <see cref="GpuFactAttribute"/>.</summary>
public sealed class GpuTheoryAttribute : TheoryAttribute
{
    public GpuTheoryAttribute([CallerFilePath] string? sourceFilePath = null, [CallerLineNumber] int sourceLineNumber = -1)
        : base(sourceFilePath, sourceLineNumber)
    {
        if (TestDevice.Missing is { } reason) Skip = reason;
    }
}
