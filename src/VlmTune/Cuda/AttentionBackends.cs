using System.Runtime.InteropServices;

namespace VlmTune.Cuda;

/// <summary>
/// Which kernels PyTorch's scaled_dot_product_attention prefers on CUDA. Recent libtorch builds put cuDNN's attention
/// first on Hopper and Blackwell (sm90 / sm100, <c>check_prefer_cudnn_attention</c> in ATen's sdp_utils.cpp), and cuDNN
/// builds an execution plan for every new problem shape (batch, query and key lengths) before it runs it.
/// - Serving meets a new shape with nearly every prefill (prompt lengths vary; a cached prefix makes the key length
///   differ from the query length). Measured on the H200 (docs/performance.md): one client whose prompts reuse a
///   cached image prefix waited 0.86 s for its first token with cuDNN first, 0.12 s with flash / memory-efficient
///   first. So chat, serve and bench decode keep cuDNN after them (<see cref="ForServing"/>).
/// - Training sees few shapes (rows rounded up to pad_to_multiple_of), and there cuDNN's kernels were faster once
///   planned (CLoT-like LoRA, the real trainer: ~15,000 against ~12,000 tokens/s after the first iterations), so
///   train and bench train keep libtorch's order (<see cref="ForTraining"/>).
/// VLMTUNE_CUDNN_ATTENTION (<see cref="RuntimeSwitches.CudnnAttention"/>) overrides both.
///
/// TorchSharp has no switch for the cuDNN backend; libtorch reads its choice from the environment
/// (<c>TORCH_CUDNN_SDPA_DEPRIORITIZED</c>, and <c>TORCH_CUDNN_SDPA_PREFERRED</c> in earlier releases) once, at the first
/// attention call, so the variables are set in the process environment — through libc, since .NET keeps its own copy
/// of the environment — before anything runs. A value the user set for either variable is left as it is.
/// </summary>
public static class AttentionBackends
{
    public const string DeprioritizedVariable = "TORCH_CUDNN_SDPA_DEPRIORITIZED";
    public const string PreferredVariable = "TORCH_CUDNN_SDPA_PREFERRED";

    /// <summary>Serving's choice: cuDNN after flash and the memory-efficient kernel, unless the switch says otherwise.</summary>
    public static void ForServing(RuntimeSwitches switches) => Configure(switches.CudnnAttention ?? false);

    /// <summary>Training's choice: libtorch's own order (cuDNN first on Hopper), unless the switch says otherwise.</summary>
    public static void ForTraining(RuntimeSwitches switches)
    {
        if (switches.CudnnAttention is { } cudnn) Configure(cudnn);
    }

    /// <summary>
    /// Sets libtorch's variables for <paramref name="cudnn"/> (false: cuDNN's attention after flash and the
    /// memory-efficient kernel; true: cuDNN first where libtorch supports it) unless they are set already. Call it before the
    /// first attention of the process (the CLI does, at start-up); later calls change nothing libtorch has read.
    /// </summary>
    public static void Configure(bool cudnn)
    {
        Set(DeprioritizedVariable, cudnn ? "0" : "1");
        Set(PreferredVariable, cudnn ? "1" : "0");
    }

    /// <summary>The value of <paramref name="name"/> in the process (C) environment, as libtorch reads it; null if unset.</summary>
    public static string? Read(string name) =>
        OperatingSystem.IsWindows() ? Environment.GetEnvironmentVariable(name) : Marshal.PtrToStringUTF8(getenv(name));

    private static void Set(string name, string value)
    {
        if (Read(name) is not null) return;
        if (OperatingSystem.IsWindows()) Environment.SetEnvironmentVariable(name, value);   // the CRT shares it on Windows
        else if (setenv(name, value, 0) != 0) throw new InvalidOperationException($"setenv({name}) failed.");
    }

    [DllImport("libc", CharSet = CharSet.Ansi)]
    private static extern IntPtr getenv(string name);

    [DllImport("libc", CharSet = CharSet.Ansi)]
    private static extern int setenv(string name, string value, int overwrite);
}
