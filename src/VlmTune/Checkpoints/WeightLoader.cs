using TorchSharp;
using static TorchSharp.torch;

namespace VlmTune.Checkpoints;

/// <summary>
/// Strict loading: every parameter of the module must be in the checkpoint with the same shape, and every checkpoint
/// tensor must belong to the module. All problems are reported at once. Tensors are read one at a time from the
/// memory-mapped files and copied into the parameters, converting dtype and device on the way.
/// </summary>
public static class WeightLoader
{
    /// <param name="include">Parameters to load (default: all but LoRA branches, which adapters supply).</param>
    public static void LoadStrict(nn.Module module, CheckpointFolder checkpoint, Func<string, bool>? include = null)
    {
        include ??= name => !name.Contains(".lora_");
        var parameters = module.named_parameters().Where(p => include(p.name)).ToDictionary(p => p.name, p => p.parameter);
        var problems = new List<string>();
        var missing = parameters.Keys.Where(k => !checkpoint.Contains(k)).OrderBy(k => k).ToList();
        var unexpected = checkpoint.Names.Where(k => !parameters.ContainsKey(k)).OrderBy(k => k).ToList();
        if (missing.Count > 0) problems.Add($"missing tensor{Plural(missing)}: {List(missing)}");
        if (unexpected.Count > 0) problems.Add($"unexpected tensor{Plural(unexpected)} (not part of this model): {List(unexpected)}");
        foreach (var (name, p) in parameters)
        {
            if (!checkpoint.Contains(name)) continue;
            var stored = checkpoint.Entry(name).Shape;
            if (!stored.SequenceEqual(p.shape))
                problems.Add($"shape mismatch for '{name}' in {Path.GetFileName(checkpoint.FileOf(name))}: expected [{string.Join(", ", p.shape)}], got [{string.Join(", ", stored)}]");
        }
        if (problems.Count > 0)
            throw new CheckpointException($"{checkpoint.Directory}: the checkpoint does not fit the model described by config.json:\n  " + string.Join("\n  ", problems));

        using var noGrad = no_grad();
        foreach (var (name, p) in parameters)
        {
            using var value = checkpoint.Read(name);
            p.copy_(value);
        }
    }

    private static string Plural<T>(List<T> items) => items.Count == 1 ? "" : "s";

    private static string List(List<string> names) =>
        string.Join(", ", names.Take(12).Select(n => $"'{n}'")) + (names.Count > 12 ? $" and {names.Count - 12} more" : "");
}
