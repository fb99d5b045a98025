using System.Runtime.InteropServices;

namespace VlmTune.Cuda;

/// <summary>
/// Which kernels PyTorch's scaled_dot_product_attention prefers on CUDA. Recent libtorch builds put cuDNN's attention
/// first on Hopper and Blackwell (sm90 / sm100, <c>check_prefer_cudnn_attention</c> in ATen's sdp_utils.cpp), and cuDNN
/// builds an execution plan for every new problem shape (batch, query and key lengths) before it runs, which costs
/// hundreds of milliseconds. Serving meets a new shape with nearly every prefill (prompt lengths vary, a cached
/// prefix makes the key length differ from the query length) and training with every new padded batch length: on the
/// H200 a request whose prompt prefix was cached waited ~0.9 s for a 110-token prefill. Flash attention (unmasked
/// passes) and the memory-efficient kernel (masked ones) need no plan, so by default they go first.
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

    /// <summary>
    /// Sets libtorch's variables for <paramref name="cudnn"/> (false: cuDNN's attention after flash and the
    /// memory-efficient kernel; true: libtorch's own default order) unless they are set already. Call it before the
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
