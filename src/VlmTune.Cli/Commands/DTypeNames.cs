using TorchSharp;

namespace VlmTune.Cli.Commands;

/// <summary>Every name a --dtype option accepts: one table for the parser, the help text and the error.</summary>
internal static class DTypeNames
{
    internal static readonly (string Name, string Alias, torch.ScalarType Type)[] All =
    [
        ("float32", "fp32", torch.ScalarType.Float32),
        ("bfloat16", "bf16", torch.ScalarType.BFloat16),
        ("float16", "fp16", torch.ScalarType.Float16),
    ];

    /// <summary>"float32, bfloat16 or float16 (also fp32, bf16, fp16)".</summary>
    internal static readonly string Help =
        $"{string.Join(", ", All[..^1].Select(d => d.Name))} or {All[^1].Name} (also {string.Join(", ", All.Select(d => d.Alias))})";

    internal static torch.ScalarType? Parse(string? name)
    {
        if (name is null) return null;
        foreach (var d in All)
            if (name == d.Name || name == d.Alias) return d.Type;
        throw new VlmTuneException($"--dtype '{name}' is not supported: {Help}.");
    }
}
