namespace VlmTune.Cuda;

/// <summary>The on/off environment switches of our CUDA kernels (VLMTUNE_FUSED_DECODE, VLMTUNE_NF4_KERNEL).</summary>
public static class KernelSwitch
{
    /// <summary>On unless <paramref name="value"/> is 0, false, off or no.</summary>
    public static bool IsOn(string? value) =>
        value is null || !(value.Trim() is "0" or "false" or "False" or "FALSE" or "off" or "no");
}
