using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using TorchSharp;
using VlmTune.IO;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Checkpoints;

/// <summary>
/// The LoRA fields of a PEFT <c>adapter_config.json</c> that VlmTune understands. <see cref="TargetModules"/> follows
/// PEFT: a list matches a module whose name equals an entry or ends with "." + entry; a single string is a regular
/// expression that must match the whole module name; "all-linear" is every linear layer but the output head.
/// </summary>
public sealed record PeftAdapterConfig
{
    public int R { get; init; } = 8;
    public double LoraAlpha { get; init; } = 8;
    public double LoraDropout { get; init; }
    public IReadOnlyList<string> TargetModules { get; init; } = [];
    /// <summary>Set when the config gave target_modules as one string (a regex, or "all-linear").</summary>
    public string? TargetModulesPattern { get; init; }
    public string? BaseModelNameOrPath { get; init; }
    /// <summary>PEFT's task_type: CAUSAL_LM for the LLM; null for a ViT adapter, as InternVL's wrap_backbone_lora writes.</summary>
    public string? TaskType { get; init; } = "CAUSAL_LM";

    public double Scaling => LoraAlpha / R;

    public const string AllLinear = "all-linear";

    /// <summary>Whether PEFT would wrap the module called <paramref name="name"/> (its path inside the adapted model).</summary>
    public bool Targets(string name, bool isOutputHead)
    {
        if (TargetModulesPattern is { } pattern)
            return pattern == AllLinear ? !isOutputHead : Regex.IsMatch(name, $"^(?:{pattern})$");
        foreach (var t in TargetModules)
            if (name == t || name.EndsWith("." + t, StringComparison.Ordinal)) return true;
        return false;
    }

    public static PeftAdapterConfig Load(string path)
    {
        if (!File.Exists(path)) throw new CheckpointException($"{path}: adapter config not found.");
        JsonNode? root;
        // Duplicate keys are an error here, not an ArgumentException when the object is first read.
        try { root = JsonNode.Parse(File.ReadAllText(path), documentOptions: new JsonDocumentOptions { AllowDuplicateProperties = false }); }
        catch (JsonException e) { throw new CheckpointException($"{path}: invalid JSON: {e.Message}"); }
        if (root is not JsonObject o) throw new CheckpointException($"{path}: expected a JSON object.");

        var problems = new List<string>();
        string? Str(string key) => o[key] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;
        bool Flag(string key) => o[key] is JsonValue v && v.TryGetValue<bool>(out var b) && b;
        double Num(string key, double fallback)
        {
            if (o[key] is null) return fallback;
            if (o[key] is JsonValue v && v.TryGetValue<double>(out var d)) return d;
            problems.Add($"'{key}' must be a number"); return fallback;
        }

        if (Str("peft_type") is { } type && type != "LORA") problems.Add($"peft_type is '{type}'; only LORA adapters are supported");
        if (Flag("use_dora")) problems.Add("use_dora is true; DoRA adapters are not supported");
        if (Flag("use_rslora")) problems.Add("use_rslora is true; rank-stabilised scaling is not supported");
        if (Flag("fan_in_fan_out")) problems.Add("fan_in_fan_out is true; only nn.Linear-layout adapters are supported");
        if (Str("bias") is { } bias && bias != "none") problems.Add($"bias is '{bias}'; only 'none' is supported");
        foreach (var key in new[] { "rank_pattern", "alpha_pattern" })
            if (o[key] is JsonObject p && p.Count > 0) problems.Add($"{key} is not empty; per-module ranks/alphas are not supported");
        if (o["modules_to_save"] is JsonArray m && m.Count > 0) problems.Add("modules_to_save is not empty; such adapters carry full modules, which VlmTune does not load");

        double rValue = Num("r", 8);
        int r = rValue == Math.Floor(rValue) && rValue is >= 1 and <= int.MaxValue ? (int)rValue : 0;
        if (r == 0 && o["r"] is JsonValue { } given && given.GetValueKind() == JsonValueKind.Number) problems.Add($"r must be a positive integer (got {given.ToJsonString()})");
        // Read before the check below: a wrong type here is a problem to report, not a value to drop.
        double alpha = Num("lora_alpha", 8), dropout = Num("lora_dropout", 0);
        if (dropout is < 0 or >= 1) problems.Add($"lora_dropout must be in [0, 1) (got {dropout})");
        var targets = new List<string>();
        string? pattern = null;
        switch (o["target_modules"])
        {
            case JsonArray arr:
                foreach (var t in arr)
                    if (t is JsonValue tv && tv.TryGetValue<string>(out var s)) targets.Add(s);
                    else problems.Add("target_modules must hold strings");
                break;
            case JsonValue v when v.TryGetValue<string>(out var s):
                pattern = s; break;
            case null:
                problems.Add("target_modules is missing (a list of module names or a regex)"); break;
            default:
                problems.Add($"target_modules must be a list of module names or a regex string, not {o["target_modules"]!.ToJsonString()}"); break;
        }
        if (problems.Count > 0)
            throw new CheckpointException($"{path}: unsupported adapter:\n  " + string.Join("\n  ", problems));
        return new PeftAdapterConfig
        {
            R = r, LoraAlpha = alpha, LoraDropout = dropout,
            TargetModules = targets, TargetModulesPattern = pattern,
            BaseModelNameOrPath = Str("base_model_name_or_path"), TaskType = Str("task_type"),
        };
    }

    /// <summary>The adapter_config.json PEFT writes for a plain LoRA adapter (every field PEFT's loader expects).</summary>
    public string ToJson()
    {
        var o = new JsonObject
        {
            ["alpha_pattern"] = new JsonObject(),
            ["auto_mapping"] = null,
            ["base_model_name_or_path"] = BaseModelNameOrPath,
            ["bias"] = "none",
            ["fan_in_fan_out"] = false,
            ["inference_mode"] = true,
            ["init_lora_weights"] = true,
            ["layer_replication"] = null,
            ["layers_pattern"] = null,
            ["layers_to_transform"] = null,
            ["loftq_config"] = new JsonObject(),
            ["lora_alpha"] = LoraAlpha,
            ["lora_dropout"] = LoraDropout,
            ["megatron_config"] = null,
            ["megatron_core"] = "megatron.core",
            ["modules_to_save"] = null,
            ["peft_type"] = "LORA",
            ["r"] = R,
            ["rank_pattern"] = new JsonObject(),
            ["revision"] = null,
            ["target_modules"] = TargetModulesPattern is { } p ? JsonValue.Create(p) : new JsonArray(TargetModules.Select(t => (JsonNode?)JsonValue.Create(t)).ToArray()),
            ["task_type"] = TaskType,
            ["use_dora"] = false,
            ["use_rslora"] = false,
        };
        // PEFT writes lora_alpha as an int when it is one; keep that so the file reads as PEFT's own.
        if (LoraAlpha == Math.Floor(LoraAlpha)) o["lora_alpha"] = (long)LoraAlpha;
        return o.ToJsonString(new JsonSerializerOptions { WriteIndented = true });
    }
}

/// <summary>
/// LoRA adapters in PEFT's on-disk format (<c>adapter_config.json</c> + <c>adapter_model.safetensors</c>), applied to one
/// part of the model (the LLM <c>language_model</c>, or <c>vision_model</c>). Tensor names are PEFT's:
/// <c>base_model.model.&lt;module path inside that part&gt;.lora_A.weight</c>.
/// </summary>
public static class PeftAdapter
{
    public const string ConfigFile = "adapter_config.json";
    public const string WeightsFile = "adapter_model.safetensors";
    public const string Prefix = "base_model.model.";

    /// <summary>The linear layers with a LoRA branch under <paramref name="scope"/>.</summary>
    public static IEnumerable<(string Name, Linear Linear)> LoraLinears(nn.Module scope) => Linear.AllIn(scope).Where(l => l.Linear.HasLora);

    /// <summary>Adds a freshly initialised LoRA branch (A uniform, B zero) to every targeted linear; returns their names.</summary>
    public static IReadOnlyList<string> Attach(nn.Module scope, PeftAdapterConfig config, ScalarType dtype = ScalarType.Float32)
    {
        var names = new List<string>();
        foreach (var (name, linear) in Linear.AllIn(scope))
        {
            if (!config.Targets(name, isOutputHead: IsOutputHead(scope, name))) continue;
            if (linear.HasLora) throw new CheckpointException($"module '{name}' already has a LoRA branch.");
            linear.AddLora(config.R, config.LoraAlpha, config.LoraDropout, dtype);
            names.Add(name);
        }
        if (names.Count == 0)
        {
            string what = config.TargetModulesPattern ?? string.Join(", ", config.TargetModules);
            throw new CheckpointException($"target_modules [{what}] match no linear layer of the model (its linear layers end in: {string.Join(", ", Linear.AllIn(scope).Select(l => l.Name.Split('.')[^1]).Distinct())}).");
        }
        return names;
    }

    /// <summary>Reads the adapter in <paramref name="dir"/>, attaches LoRA branches to <paramref name="scope"/> and loads them strictly.</summary>
    public static PeftAdapterConfig Load(nn.Module scope, string dir, ScalarType dtype = ScalarType.Float32)
    {
        if (!Directory.Exists(dir)) throw new CheckpointException($"{dir}: adapter folder not found.");
        var config = PeftAdapterConfig.Load(Path.Combine(dir, ConfigFile));
        string weightsPath = Path.Combine(dir, WeightsFile);
        if (!File.Exists(weightsPath))
        {
            string hint = File.Exists(Path.Combine(dir, "adapter_model.bin")) ? " It holds adapter_model.bin only; save the adapter with safe_serialization=True." : "";
            throw new CheckpointException($"{weightsPath}: not found.{hint}");
        }
        using var file = SafetensorsFile.Open(weightsPath);
        AdapterCheckpoint.RequireFinite(file);
        var attached = Attach(scope, config, dtype);
        try
        {
            LoadWeights(scope, file);
        }
        catch
        {
            foreach (var name in attached) ((Linear)scope.named_modules().First(m => m.name == name).module).RemoveLora();
            throw;
        }
        return config;
    }

    /// <summary>The adapter file's name of the LoRA tensor named <paramref name="nameInScope"/> inside the adapted module.</summary>
    public static string TensorName(string nameInScope) => Prefix + nameInScope;

    /// <summary>Copies every LoRA tensor of the file into the matching branch; all missing, unexpected or misshapen tensors are reported at once.</summary>
    public static void LoadWeights(nn.Module scope, SafetensorsFile file)
    {
        var targets = new Dictionary<string, TorchSharp.Modules.Parameter>(StringComparer.Ordinal);
        foreach (var (name, linear) in LoraLinears(scope))
        {
            targets[$"{Prefix}{name}.lora_A.weight"] = linear.lora_A!.weight;
            targets[$"{Prefix}{name}.lora_B.weight"] = linear.lora_B!.weight;
        }
        WeightLoader.Copy(targets, file, requireAll: true, "the adapter does not fit the model (check r and target_modules in adapter_config.json)");
    }

    /// <summary>
    /// Writes <paramref name="scope"/>'s LoRA branches as a PEFT adapter folder (each file atomically).
    /// <paramref name="exactValue"/> may supply, by the tensor's name inside <paramref name="scope"/>, a more precise
    /// value than the module holds (the trainer's fp32 master of a bf16 weight); null keeps the module's.
    /// </summary>
    public static void Save(nn.Module scope, string dir, PeftAdapterConfig config, Func<string, Tensor?>? exactValue = null)
    {
        Directory.CreateDirectory(dir);
        var tensors = new List<KeyValuePair<string, Tensor>>();
        foreach (var (name, linear) in LoraLinears(scope).OrderBy(l => l.Name, StringComparer.Ordinal))
        {
            tensors.Add(new($"{Prefix}{name}.lora_A.weight", exactValue?.Invoke($"{name}.lora_A.weight") ?? linear.lora_A!.weight));
            tensors.Add(new($"{Prefix}{name}.lora_B.weight", exactValue?.Invoke($"{name}.lora_B.weight") ?? linear.lora_B!.weight));
        }
        if (tensors.Count == 0) throw new InvalidOperationException("the model has no LoRA branch to save.");
        SafetensorsWriter.Write(Path.Combine(dir, WeightsFile), tensors);
        AtomicFile.WriteAllText(Path.Combine(dir, ConfigFile), config.ToJson());
    }

    private static bool IsOutputHead(nn.Module scope, string name) => scope is CausalLanguageModel lm && name == lm.OutputHeadName;
}
