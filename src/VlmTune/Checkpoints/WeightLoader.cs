using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace VlmTune.Checkpoints;

/// <summary>Tensors by name: a checkpoint folder, or one safetensors file.</summary>
public interface ITensorSource
{
    /// <summary>The file or folder, for messages.</summary>
    string Location { get; }
    IEnumerable<string> Names { get; }
    bool Contains(string name);
    SafetensorsEntry Entry(string name);
    /// <summary>The file holding <paramref name="name"/>, for messages.</summary>
    string FileOf(string name);
    Tensor Read(string name);
    /// <summary>How the files name <paramref name="name"/>, for messages (an hf-layout folder stores other names).</summary>
    string StoredName(string name) => name;
}

/// <summary>
/// Strict loading, the one place where stored tensors are copied into parameters: names and shapes must match, every
/// problem is reported at once, and tensors are read one at a time from the memory-mapped files and copied into the
/// parameters, converting dtype and device on the way.
/// </summary>
public static class WeightLoader
{
    /// <summary>Loads a model folder's weights into <paramref name="module"/>: every parameter must be stored, nothing else may be.</summary>
    /// <param name="include">Parameters to load (default: all but LoRA branches, which adapters supply).</param>
    public static void LoadStrict(nn.Module module, ITensorSource checkpoint, Func<string, bool>? include = null)
    {
        include ??= name => !name.Contains(".lora_");
        var targets = module.named_parameters().Where(p => include(p.name)).ToDictionary(p => p.name, p => p.parameter);
        Copy(targets, checkpoint, requireAll: true, "the checkpoint does not fit the model described by config.json");
    }

    /// <summary>
    /// Copies the source's tensors into <paramref name="targets"/> (stored name → parameter). Every stored tensor must have
    /// a target of its shape; with <paramref name="requireAll"/> every target must be stored too. Returns the count copied.
    /// </summary>
    /// <param name="mismatch">What a mismatch means, e.g. "the adapter does not fit the model".</param>
    public static int Copy(IReadOnlyDictionary<string, Parameter> targets, ITensorSource source, bool requireAll, string mismatch)
    {
        var problems = new List<string>();
        var missing = requireAll ? targets.Keys.Where(k => !source.Contains(k)).OrderBy(k => k, StringComparer.Ordinal).ToList() : [];
        var unexpected = source.Names.Where(k => !targets.ContainsKey(k)).OrderBy(k => k, StringComparer.Ordinal).ToList();
        if (missing.Count > 0) problems.Add($"missing tensor{Plural(missing)}: {List(missing, source)}");
        if (unexpected.Count > 0) problems.Add($"unexpected tensor{Plural(unexpected)} (not part of this model): {List(unexpected, source)}");
        foreach (var (name, p) in targets)
        {
            if (!source.Contains(name)) continue;
            var stored = source.Entry(name).Shape;
            if (!stored.SequenceEqual(p.shape))
                problems.Add($"shape mismatch for '{source.StoredName(name)}' in {Path.GetFileName(source.FileOf(name))}: expected [{string.Join(", ", p.shape)}], got [{string.Join(", ", stored)}]");
        }
        if (problems.Count > 0)
            throw new CheckpointException($"{source.Location}: {mismatch}:\n  " + string.Join("\n  ", problems));

        using var noGrad = no_grad();
        int copied = 0;
        foreach (var (name, p) in targets)
        {
            if (!source.Contains(name)) continue;
            using var value = source.Read(name);
            p.copy_(value);
            copied++;
        }
        return copied;
    }

    private static string Plural<T>(List<T> items) => items.Count == 1 ? "" : "s";

    private static string List(List<string> names, ITensorSource source) =>
        string.Join(", ", names.Take(12).Select(n => $"'{source.StoredName(n)}'")) + (names.Count > 12 ? $" and {names.Count - 12} more" : "");
}
