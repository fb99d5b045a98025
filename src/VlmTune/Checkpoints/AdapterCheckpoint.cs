using System.Text.Json;
using VlmTune.Models;
using static VlmTune.Checkpoints.IterCheckpoint;

namespace VlmTune.Checkpoints;

/// <summary>One LoRA module of an adapter: the model path of the linear layer and its A / B tensors in the adapter file.</summary>
public sealed record LoraModule(string Module, string AKey, string BKey)
{
    /// <summary>The base weight this branch is merged into (full model naming).</summary>
    public string WeightName => Module + ".weight";
}

/// <summary>
/// One PEFT LoRA adapter folder and the part of InternVL2 its names are relative to: <c>language_model.</c> (LLM
/// adapters, as XTuner and VlmTune save them), <c>vision_model.</c> (InternViT adapters) or the whole model ("").
/// </summary>
public sealed class LoraAdapterPart : IDisposable
{
    public required string Dir { get; init; }
    public required PeftAdapterConfig Config { get; init; }
    public required SafetensorsFile Weights { get; init; }
    /// <summary>Prefix that turns the adapter's module names into full model paths.</summary>
    public required string Root { get; init; }
    public required IReadOnlyList<LoraModule> Modules { get; init; }

    public string Part => Root switch { "language_model." => "LLM", "vision_model." => "vision", _ => "whole-model" };

    public void Dispose() => Weights.Dispose();
}

/// <summary>
/// What <c>--adapter</c> points at: a VlmTune training checkpoint (<c>iter_&lt;n&gt;/</c>: LLM LoRA at the top,
/// <c>vision_lora/</c>, <c>trainable.safetensors</c> with the trained projector or full weights, optimizer and
/// trainer state), a training work dir (its latest checkpoint is used), or a plain PEFT LoRA adapter folder for the LLM
/// or the vision encoder. <see cref="Open"/> validates everything against the base model's tensor shapes at once.
/// </summary>
public sealed class AdapterCheckpoint : IDisposable
{
    private static readonly string[] Roots = ["language_model.", "vision_model.", ""];

    public string Dir { get; }
    /// <summary>"full", "lora" or "qlora" for a training checkpoint; null for a plain PEFT adapter.</summary>
    public string? TrainingMode { get; }
    public IReadOnlyList<LoraAdapterPart> Loras { get; }
    /// <summary>Trained non-LoRA weights (full model names) that replace the base ones; null when none.</summary>
    public SafetensorsFile? FullWeights { get; }

    public int LoraModuleCount => Loras.Sum(l => l.Modules.Count);

    private AdapterCheckpoint(string dir, string? mode, List<LoraAdapterPart> loras, SafetensorsFile? full)
    {
        Dir = dir; TrainingMode = mode; Loras = loras; FullWeights = full;
    }

    /// <summary>Opens and validates <paramref name="dir"/> against the base model's tensors (full name → shape).</summary>
    public static AdapterCheckpoint Open(string dir, IReadOnlyDictionary<string, long[]> baseShapes)
    {
        dir = Resolve(dir);
        string? mode = null;
        string statePath = Path.Combine(dir, StateFile);
        if (File.Exists(statePath))
        {
            try
            {
                using var doc = JsonDocument.Parse(File.ReadAllText(statePath));
                if (doc.RootElement.TryGetProperty("mode", out var m) && m.ValueKind == JsonValueKind.String) mode = m.GetString();
            }
            catch (JsonException e) { throw new CheckpointException($"{statePath}: invalid JSON: {e.Message}"); }
            mode ??= "unknown";
        }

        var loras = new List<LoraAdapterPart>();
        SafetensorsFile? full = null;
        var problems = new List<string>();
        try
        {
            foreach (var adapterDir in new[] { dir, Path.Combine(dir, VisionAdapterDir) })
            {
                if (!File.Exists(Path.Combine(adapterDir, PeftAdapter.ConfigFile))) continue;
                var part = OpenLora(adapterDir, baseShapes, problems);
                if (part is not null) loras.Add(part);
            }
            string fullPath = Path.Combine(dir, TrainedWeights.FileName);
            if (File.Exists(fullPath))
            {
                full = SafetensorsFile.Open(fullPath);
                foreach (var (name, entry) in full.Entries.OrderBy(e => e.Key, StringComparer.Ordinal))
                {
                    if (!baseShapes.TryGetValue(name, out var shape))
                        problems.Add($"{fullPath}: tensor '{name}' is not part of the base model");
                    else if (!shape.SequenceEqual(entry.Shape))
                        problems.Add($"{fullPath}: tensor '{name}' has shape [{string.Join(", ", entry.Shape)}], the base model's is [{string.Join(", ", shape)}]");
                }
            }
            if (loras.Count == 0 && full is null && problems.Count == 0)
                problems.Add($"{dir}: no {PeftAdapter.ConfigFile}, {VisionAdapterDir}/ or {TrainedWeights.FileName} found; pass a PEFT LoRA adapter folder, an iter_<n> checkpoint of a training run, or its work dir");
            if (problems.Count > 0)
                throw new CheckpointException($"{dir}: the adapter does not fit the base model:\n  " + string.Join("\n  ", problems));
            // NaN weights would not fail loudly: the model would answer one token over and over (chat, serve, merge alike).
            foreach (var file in loras.Select(l => l.Weights).Append(full).OfType<SafetensorsFile>()) RequireFinite(file);
        }
        catch
        {
            foreach (var l in loras) l.Dispose();
            full?.Dispose();
            throw;
        }
        return new AdapterCheckpoint(Path.GetFullPath(dir), mode, loras, full);
    }

    /// <summary>Refuses a file of trained weights that holds NaN or infinite values, naming the file and its tensors.</summary>
    public static void RequireFinite(SafetensorsFile file)
    {
        if (NonFiniteProblem(file) is { } problem) throw new CheckpointException(problem + ".");
    }

    private static string? NonFiniteProblem(SafetensorsFile file)
    {
        var bad = file.NonFiniteTensors();
        if (bad.Count == 0) return null;
        string names = string.Join(", ", bad.Take(4).Select(n => $"'{n}'")) + (bad.Count > 4 ? $" and {bad.Count - 4} more" : "");
        return $"{file.Path}: tensor{(bad.Count == 1 ? "" : "s")} {names} hold{(bad.Count == 1 ? "s" : "")} NaN or infinite values " +
               "(saved from a diverged run?); these weights cannot be used, take an earlier checkpoint";
    }

    /// <summary>A training work dir stands for its latest complete checkpoint.</summary>
    private static string Resolve(string dir)
    {
        if (!Directory.Exists(dir)) throw new CheckpointException($"{Path.GetFullPath(dir)}: adapter folder not found.");
        bool isCheckpoint = File.Exists(Path.Combine(dir, StateFile)) || File.Exists(Path.Combine(dir, PeftAdapter.ConfigFile))
            || File.Exists(Path.Combine(dir, TrainedWeights.FileName));
        if (isCheckpoint) return dir;
        if (File.Exists(Path.Combine(dir, LastCheckpointFile)) || Directory.EnumerateDirectories(dir, "iter_*").Any())
            return Latest(dir)
                ?? throw new CheckpointException($"{Path.GetFullPath(dir)}: a training work dir without a complete checkpoint (iter_<n>/ with {StateFile}).");
        return dir;
    }

    private static LoraAdapterPart? OpenLora(string dir, IReadOnlyDictionary<string, long[]> baseShapes, List<string> problems)
    {
        var config = PeftAdapterConfig.Load(Path.Combine(dir, PeftAdapter.ConfigFile));
        string weightsPath = Path.Combine(dir, PeftAdapter.WeightsFile);
        if (!File.Exists(weightsPath))
        {
            string hint = File.Exists(Path.Combine(dir, "adapter_model.bin")) ? " It holds adapter_model.bin only; save the adapter with safe_serialization=True." : "";
            problems.Add($"{weightsPath}: not found.{hint}");
            return null;
        }
        var file = SafetensorsFile.Open(weightsPath);
        int before = problems.Count;
        var modules = new SortedDictionary<string, (string? A, string? B)>(StringComparer.Ordinal);
        foreach (var key in file.Entries.Keys)
        {
            string? module = null, part = null;
            foreach (var p in new[] { "lora_A", "lora_B" })
                if (key.StartsWith(PeftAdapter.Prefix, StringComparison.Ordinal) && key.EndsWith($".{p}.weight", StringComparison.Ordinal))
                {
                    module = key[PeftAdapter.Prefix.Length..^$".{p}.weight".Length];
                    part = p;
                }
            if (module is null) { problems.Add($"{weightsPath}: '{key}' is not a LoRA tensor (base_model.model.<module>.lora_A/lora_B.weight)"); continue; }
            var ab = modules.GetValueOrDefault(module);
            modules[module] = part == "lora_A" ? (key, ab.B) : (ab.A, key);
        }

        // The names are relative to the LLM, the vision encoder or the whole model: the first root under which every
        // module is a 2-D weight of the base model is the one.
        string? root = Roots.FirstOrDefault(r => modules.Keys.All(m => baseShapes.TryGetValue(r + m + ".weight", out var s) && s.Length == 2));
        if (root is null)
        {
            var unknown = modules.Keys.Where(m => !Roots.Any(r => baseShapes.ContainsKey(r + m + ".weight"))).Take(4).Select(m => $"'{m}'");
            problems.Add($"{weightsPath}: its modules are not linear layers of the base model, neither under language_model, vision_model nor the whole model (e.g. {string.Join(", ", unknown.DefaultIfEmpty("a mix of parts"))})");
            file.Dispose();
            return null;
        }

        var list = new List<LoraModule>();
        foreach (var (module, (a, b)) in modules)
        {
            string full = root + module;
            if (a is null || b is null) { problems.Add($"{weightsPath}: '{module}' has lora_{(a is null ? "A" : "B")} missing"); continue; }
            if (!config.Targets(module, isOutputHead: CausalLanguageModel.IsOutputHeadName(full, root)))
                problems.Add($"{weightsPath}: '{module}' is not among target_modules of {PeftAdapter.ConfigFile}");
            long[] w = baseShapes[full + ".weight"], sa = file.Entries[a].Shape, sb = file.Entries[b].Shape;
            if (sa.Length != 2 || sb.Length != 2 || sa[0] != config.R || sb[1] != config.R || sa[1] != w[1] || sb[0] != w[0])
                problems.Add($"{weightsPath}: '{module}': lora_A [{string.Join(", ", sa)}] and lora_B [{string.Join(", ", sb)}] do not fit the base weight [{string.Join(", ", w)}] with r={config.R} (A must be [r, in], B [out, r])");
            list.Add(new LoraModule(full, a, b));
        }
        // With a list of target modules, every targeted linear layer of that part must have its branch.
        if (config.TargetModulesPattern is null)
        {
            var present = list.Select(l => l.Module).ToHashSet(StringComparer.Ordinal);
            var missing = baseShapes.Where(s => s.Key.StartsWith(root, StringComparison.Ordinal) && s.Key.EndsWith(".weight", StringComparison.Ordinal) && s.Value.Length == 2)
                .Select(s => s.Key[..^".weight".Length])
                .Where(m => !present.Contains(m) && config.Targets(m[root.Length..], isOutputHead: CausalLanguageModel.IsOutputHeadName(m, root)))
                .OrderBy(m => m, StringComparer.Ordinal).ToList();
            if (missing.Count > 0)
                problems.Add($"{weightsPath}: no LoRA tensors for targeted module{(missing.Count == 1 ? "" : "s")} {string.Join(", ", missing.Take(6).Select(m => $"'{m[root.Length..]}'"))}{(missing.Count > 6 ? $" and {missing.Count - 6} more" : "")}");
        }
        if (list.Count == 0 && problems.Count == before) problems.Add($"{weightsPath}: holds no LoRA tensor");
        if (problems.Count > before) { file.Dispose(); return null; }
        return new LoraAdapterPart { Dir = dir, Config = config, Weights = file, Root = root, Modules = list };
    }

    /// <summary>One line for logs: what the adapter holds.</summary>
    public string Describe()
    {
        var parts = Loras.Select(l => $"{l.Part} LoRA r={l.Config.R} alpha={l.Config.LoraAlpha} on {l.Modules.Count} layers").ToList();
        if (FullWeights is not null) parts.Add($"{FullWeights.Entries.Count} trained tensors ({string.Join(", ", FullWeights.Entries.Keys.Select(k => k.Split('.')[0]).Distinct())})");
        return (TrainingMode is null ? "PEFT adapter: " : $"training checkpoint ({TrainingMode}): ") + string.Join("; ", parts);
    }

    public void Dispose()
    {
        foreach (var l in Loras) l.Dispose();
        FullWeights?.Dispose();
    }
}
