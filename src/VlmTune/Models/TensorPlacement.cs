using System.Text.RegularExpressions;
using TorchSharp;
using static TorchSharp.torch;

namespace VlmTune.Models;

/// <summary>
/// Device and dtype names as people write them (CLI options, training recipes, library options): the one place that
/// knows the spellings, so every entry point accepts the same names. Messages name the caller's option or field
/// (<c>--device</c>, <c>'device':</c>), so a bad value points at where it was written.
/// </summary>
public static partial class TensorPlacement
{
    /// <summary>The device names accepted, as messages and help texts list them.</summary>
    public const string DeviceNames = "cpu, cuda or cuda:N";

    /// <summary>Each compute dtype: its config.json name (<c>torch_dtype</c>), then the short name recipes and logs use.</summary>
    private static readonly (ScalarType DType, string Name, string ShortName)[] DTypes =
    [
        (ScalarType.Float32, "float32", "fp32"),
        (ScalarType.BFloat16, "bfloat16", "bf16"),
        (ScalarType.Float16, "float16", "fp16"),
    ];

    /// <summary>Every dtype name accepted, for help texts: "float32, bfloat16 or float16 (or fp32, bf16, fp16)".</summary>
    public static string DTypeNames { get; } =
        $"{string.Join(", ", DTypes[..^1].Select(d => d.Name))} or {DTypes[^1].Name} (or {string.Join(", ", DTypes.Select(d => d.ShortName))})";

    /// <summary>Every dtype spelling accepted (both names of each).</summary>
    public static IEnumerable<string> AcceptedDTypeNames => DTypes.SelectMany(d => new[] { d.Name, d.ShortName });

    [GeneratedRegex("^cuda:[0-9]+$")]
    private static partial Regex CudaOrdinal();

    /// <summary>cpu, cuda (the current GPU) or cuda:N.</summary>
    public static bool IsDeviceName(string? name) => name is "cpu" or "cuda" || (name is not null && CudaOrdinal().IsMatch(name));

    /// <summary>What is wrong with a device name, in one line that starts with <paramref name="field"/>; null when it is fine.</summary>
    public static string? DeviceProblem(string? name, string field) =>
        IsDeviceName(name) ? null : $"{field} '{name}' is not {DeviceNames}";

    /// <summary>The device <paramref name="name"/> means, refused in one line when it is no device name or names a GPU this process cannot use.</summary>
    public static Device ParseDevice(string name, string option = "--device")
    {
        if (DeviceProblem(name, option) is { } problem) throw new VlmTuneException(problem + ".");
        var device = new Device(name);
        if (device.type == DeviceType.CUDA && !cuda.is_available())
            throw new VlmTuneException($"{option} {name}: CUDA is not available (no GPU, or the app runs on the CPU-only libtorch).");
        return device;
    }

    /// <summary>The dtype of any of its names (float32 or fp32, bfloat16 or bf16, float16 or fp16).</summary>
    public static bool TryParseDType(string? name, out ScalarType dtype)
    {
        foreach (var d in DTypes)
        {
            if (name != d.Name && name != d.ShortName) continue;
            dtype = d.DType;
            return true;
        }
        dtype = default;
        return false;
    }

    /// <summary>The dtype an option names; null for an absent option (the caller's default applies).</summary>
    public static ScalarType? ParseDType(string? name, string option = "--dtype") =>
        name is null ? null
        : TryParseDType(name, out var dtype) ? dtype
        : throw new VlmTuneException($"{option} '{name}' is not supported ({string.Join(", ", DTypes.Select(d => d.Name))}).");

    /// <summary>The name config.json's <c>torch_dtype</c> uses: "float32", "bfloat16", "float16".</summary>
    public static string ConfigName(ScalarType dtype) => Entry(dtype).Name;

    /// <summary>The short name training recipes and logs use: "fp32", "bf16", "fp16".</summary>
    public static string ShortName(ScalarType dtype) => Entry(dtype).ShortName;

    private static (ScalarType DType, string Name, string ShortName) Entry(ScalarType dtype)
    {
        foreach (var d in DTypes)
            if (d.DType == dtype) return d;
        throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "not a compute dtype (float32, bfloat16, float16)");
    }
}
