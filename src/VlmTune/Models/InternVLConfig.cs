using System.Text.Json;

namespace VlmTune.Models;

/// <summary>InternViT settings (config.json → vision_config).</summary>
public sealed record VisionConfig
{
    public required int HiddenSize { get; init; }
    public required int NumHiddenLayers { get; init; }
    public required int NumAttentionHeads { get; init; }
    public required int IntermediateSize { get; init; }
    public int ImageSize { get; init; } = 448;
    public int PatchSize { get; init; } = 14;
    public int NumChannels { get; init; } = 3;
    /// <summary>"layer_norm" or "rms_norm".</summary>
    public string NormType { get; init; } = "rms_norm";
    public double LayerNormEps { get; init; } = 1e-6;
    public bool QkNormalization { get; init; }
    public bool QkvBias { get; init; } = true;
    public string HiddenAct { get; init; } = "gelu";
    public double InitializerFactor { get; init; } = 1.0;

    public int HeadDim => HiddenSize / NumAttentionHeads;
    public int PatchesPerSide => ImageSize / PatchSize;
}

/// <summary>
/// RoPE scaling (config.json → llm_config.rope_scaling): <c>linear</c> and <c>dynamic</c> (NTK) with a factor;
/// <c>longrope</c> (Phi-3's <c>su</c>) with per-frequency short and long factors.
/// </summary>
public sealed record RopeScaling(string Type, double Factor)
{
    public IReadOnlyList<double>? ShortFactor { get; init; }
    public IReadOnlyList<double>? LongFactor { get; init; }
}

/// <summary>The LLM architectures of the InternVL family (llm_config.architectures[0]).</summary>
public static class LlmArchitectures
{
    public const string InternLM2 = "InternLM2ForCausalLM";
    public const string Qwen2 = "Qwen2ForCausalLM";
    public const string Qwen3 = "Qwen3ForCausalLM";
    public const string Llama = "LlamaForCausalLM";
    public const string Phi3 = "Phi3ForCausalLM";

    public static readonly IReadOnlyList<string> Supported = [InternLM2, Qwen2, Qwen3, Llama, Phi3];

    /// <summary>Released InternVL LLMs that have no backend yet, with the checkpoints that use them.</summary>
    public static readonly IReadOnlyDictionary<string, string> NotYetSupported = new Dictionary<string, string>
    {
        ["Qwen3MoeForCausalLM"] = "the InternVL3.5 MoE checkpoints (InternVL3.5-30B-A3B, 241B-A28B)",
        ["GptOssForCausalLM"] = "InternVL3.5-GPT-OSS-20B-A4B",
        ["InternLM3ForCausalLM"] = "the InternLM3-based InternVL3 checkpoints",
    };
}

/// <summary>LLM settings (config.json → llm_config), for every supported architecture.</summary>
public sealed record LlmConfig
{
    public required string Architecture { get; init; }
    public required int HiddenSize { get; init; }
    public required int NumHiddenLayers { get; init; }
    public required int NumAttentionHeads { get; init; }
    public required int NumKeyValueHeads { get; init; }
    public required int IntermediateSize { get; init; }
    public required int VocabSize { get; init; }
    public double RmsNormEps { get; init; } = 1e-6;
    public double RopeTheta { get; init; } = 10000;
    public RopeScaling? RopeScaling { get; init; }
    public int MaxPositionEmbeddings { get; init; } = 2048;
    /// <summary>Phi-3 longrope: the context the short factors were trained for.</summary>
    public int OriginalMaxPositionEmbeddings { get; init; }
    /// <summary>InternLM2's <c>bias</c>: biases on wqkv and wo.</summary>
    public bool Bias { get; init; }
    /// <summary>Biases on the q/k/v projections: Qwen2 always; Llama, Qwen3 and Phi-3 per <c>attention_bias</c>.</summary>
    public bool QkvBias { get; init; }
    /// <summary>A bias on the attention output projection (Llama / Qwen3 <c>attention_bias</c>; never Qwen2's o_proj).</summary>
    public bool OutputProjBias { get; init; }
    /// <summary>Biases on the MLP projections (Llama's <c>mlp_bias</c>).</summary>
    public bool MlpBias { get; init; }
    /// <summary>Qwen3: RMSNorm over each head's queries and keys before the rotary embedding.</summary>
    public bool QkNorm { get; init; }
    public bool TieWordEmbeddings { get; init; }
    public string HiddenAct { get; init; } = "silu";
    public int BosTokenId { get; init; } = 1;
    public int EosTokenId { get; init; } = 2;

    /// <summary>Width of one attention head: <c>head_dim</c> where given (Qwen3's differs from hidden / heads).</summary>
    public int HeadDim { get => _headDim > 0 ? _headDim : HiddenSize / NumAttentionHeads; init => _headDim = value; }
    private readonly int _headDim;

    public int KeyValueGroups => NumAttentionHeads / NumKeyValueHeads;
}

/// <summary>
/// InternVLChatConfig as written in an official model folder's config.json, or translated from the Hugging Face layout's
/// (<see cref="HfConfig"/>). Unknown fields are ignored (HF configs carry many generic ones); missing required fields are
/// named in the error.
/// </summary>
public sealed record InternVLConfig
{
    public required VisionConfig Vision { get; init; }
    public required LlmConfig Llm { get; init; }
    public string Template { get; init; } = "internlm2-chat";
    /// <summary>config.json's <c>system_message</c>: replaces the template's default, as the official model does.</summary>
    public string? SystemMessage { get; init; }
    public double DownsampleRatio { get; init; } = 0.5;
    public int ForceImageSize { get; init; } = 448;
    public int SelectLayer { get; init; } = -1;
    public string PsVersion { get; init; } = "v2";
    public bool UseThumbnail { get; init; } = true;
    public int MinDynamicPatch { get; init; } = 1;
    public int MaxDynamicPatch { get; init; } = DefaultMaxDynamicPatch;
    /// <summary>max_dynamic_patch of a config.json that does not say (the official code's default).</summary>
    public const int DefaultMaxDynamicPatch = 12;
    public bool DynamicImageSize { get; init; } = true;
    /// <summary>How the folder names its config fields and weights; every module keeps the official names either way.</summary>
    public CheckpointLayout Layout { get; init; } = CheckpointLayout.Official;

    /// <summary>Image tokens per tile: (448/14)² patches, merged 2×2 by pixel shuffle = 256.</summary>
    public int NumImageToken => (int)Math.Round(Math.Pow(ForceImageSize / Vision.PatchSize, 2) * DownsampleRatio * DownsampleRatio);

    /// <summary>Width of the projector input: ViT hidden × (1/downsample)².</summary>
    public int ProjectorInputSize => Vision.HiddenSize * (int)Math.Round(1 / DownsampleRatio) * (int)Math.Round(1 / DownsampleRatio);

    public static InternVLConfig Load(string modelDir)
    {
        string path = Directory.Exists(modelDir) ? Path.Combine(modelDir, "config.json") : modelDir;
        if (!File.Exists(path)) throw new VlmTuneException($"{path}: not found. Point --model at an InternVL2 model folder (config.json, *.safetensors, tokenizer.model).");
        JsonDocument doc;
        try { doc = JsonDocument.Parse(File.ReadAllText(path)); }
        catch (JsonException e) { throw new VlmTuneException($"{path}: invalid JSON: {e.Message}"); }
        using (doc) return Parse(doc.RootElement, path, Path.GetDirectoryName(Path.GetFullPath(path)));
    }

    /// <summary>Parses a config.json of either layout.</summary>
    /// <param name="modelDir">The folder, for the hf layout's preprocessor_config.json (tiling limits); null: its defaults.</param>
    public static InternVLConfig Parse(JsonElement root, string source, string? modelDir = null)
    {
        var problems = new List<string>();
        if (!HfConfig.IsHfConfig(root))
            return ParseOfficial(root, source, "llm_config", problems) ?? throw Problems(source, problems);
        var official = HfConfig.ToOfficialConfig(root, modelDir, problems);
        if (problems.Count > 0) throw Problems(source, problems);
        // Problems of the fields the translation carried over name them as the hf config does (text_config.…).
        using var doc = JsonDocument.Parse(official.ToJsonString());
        var config = ParseOfficial(doc.RootElement, source, "text_config", problems);
        if (config is not null) HfConfig.CheckParsed(root, config, modelDir, problems);
        if (problems.Count > 0) throw Problems(source, problems);
        return config! with { Layout = CheckpointLayout.Hf };
    }

    private static VlmTuneException Problems(string source, List<string> problems)
    {
        var all = problems.Distinct().ToList();
        return new VlmTuneException($"{source}: {(all.Count == 1 ? all[0] : "\n  " + string.Join("\n  ", all))}");
    }

    /// <summary>An official config, or null with the problems added to <paramref name="problems"/>.</summary>
    /// <param name="llmLabel">How messages name the LLM section: llm_config, or text_config for a translated hf config.</param>
    private static InternVLConfig? ParseOfficial(JsonElement root, string source, string llmLabel, List<string> problems)
    {
        string L = llmLabel;
        var r = new JsonFields(root, source, "", problems);
        var v = r.Object("vision_config");
        var l = r.Object("llm_config", label: L);

        string arch = l.Has("architectures") ? l.StringArrayFirst("architectures") : LlmArchitectures.InternLM2;
        if (LlmArchitectures.NotYetSupported.TryGetValue(arch, out var family))
            r.Problems.Add($"{L}.architectures is '{arch}' ({family}), which VlmTune does not support yet (supported: {string.Join(", ", LlmArchitectures.Supported)}).");
        else if (!LlmArchitectures.Supported.Contains(arch))
            r.Problems.Add($"{L}.architectures is '{arch}', which VlmTune does not support (supported: {string.Join(", ", LlmArchitectures.Supported)}).");
        bool internLm = arch == LlmArchitectures.InternLM2;

        RopeScaling? scaling = null;
        if (l.Has("rope_scaling") && l.Element("rope_scaling").ValueKind == JsonValueKind.Object)
        {
            var rs = l.Object("rope_scaling");
            string type = rs.Has("type") ? rs.String("type") : rs.String("rope_type");
            if (type is "su" or "longrope")
                scaling = new RopeScaling("longrope", 1) { ShortFactor = rs.DoubleArray("short_factor"), LongFactor = rs.DoubleArray("long_factor") };
            else if (type is "dynamic" or "linear")
                scaling = new RopeScaling(type, rs.Double("factor"));
            else if (type != "default")
                r.Problems.Add($"{L}.rope_scaling.type '{type}' is not supported (supported: dynamic, linear, longrope).");
        }
        if (l.Bool("use_sliding_window", false))
            r.Problems.Add($"{L}.use_sliding_window is true; VlmTune attends over the whole sequence (no released InternVL checkpoint uses a sliding window).");
        if (l.Has("partial_rotary_factor") && l.Double("partial_rotary_factor") != 1.0)
            r.Problems.Add($"{L}.partial_rotary_factor other than 1 is not supported.");
        // The Llama layout's bias switches: Qwen2 has q/k/v biases by definition, the others follow attention_bias.
        bool attentionBias = l.Bool("attention_bias", false);

        var vision = new VisionConfig
        {
            HiddenSize = v.Int("hidden_size"), NumHiddenLayers = v.Int("num_hidden_layers"),
            NumAttentionHeads = v.Int("num_attention_heads"), IntermediateSize = v.Int("intermediate_size"),
            ImageSize = v.Int("image_size", 448), PatchSize = v.Int("patch_size", 14), NumChannels = v.Int("num_channels", 3),
            NormType = v.String("norm_type", "rms_norm"), LayerNormEps = v.Double("layer_norm_eps", 1e-6),
            QkNormalization = v.Bool("qk_normalization", false), QkvBias = v.Bool("qkv_bias", true),
            HiddenAct = v.String("hidden_act", "gelu"), InitializerFactor = v.Double("initializer_factor", 1.0),
        };
        if (vision.NormType is not ("layer_norm" or "rms_norm")) r.Problems.Add($"vision_config.norm_type '{vision.NormType}' is not supported (layer_norm, rms_norm).");
        var llm = new LlmConfig
        {
            Architecture = arch,
            HiddenSize = l.Int("hidden_size"), NumHiddenLayers = l.Int("num_hidden_layers"),
            NumAttentionHeads = l.Int("num_attention_heads"), NumKeyValueHeads = l.Int("num_key_value_heads", l.Int("num_attention_heads")),
            IntermediateSize = l.Int("intermediate_size"), VocabSize = l.Int("vocab_size"),
            RmsNormEps = l.Double("rms_norm_eps", 1e-6), RopeTheta = l.Double("rope_theta", 10000), RopeScaling = scaling,
            MaxPositionEmbeddings = l.Int("max_position_embeddings", 2048),
            OriginalMaxPositionEmbeddings = l.Int("original_max_position_embeddings", l.Int("max_position_embeddings", 2048)),
            Bias = internLm && l.Bool("bias", false),
            QkvBias = !internLm && (arch == LlmArchitectures.Qwen2 || attentionBias),
            OutputProjBias = !internLm && arch != LlmArchitectures.Qwen2 && attentionBias,
            MlpBias = arch == LlmArchitectures.Llama && l.Bool("mlp_bias", false),
            QkNorm = arch == LlmArchitectures.Qwen3,
            TieWordEmbeddings = l.Bool("tie_word_embeddings", false), HiddenAct = l.String("hidden_act", "silu"),
            BosTokenId = l.IntOrFirst("bos_token_id", 1), EosTokenId = l.IntOrFirst("eos_token_id", 2),
            HeadDim = l.Int("head_dim", 0),
        };
        if (internLm && llm.TieWordEmbeddings)
            r.Problems.Add($"{L}.tie_word_embeddings is true, but InternLM2 checkpoints always store an output head of their own.");
        if (scaling is { Type: "longrope" } lr && (lr.ShortFactor?.Count != llm.HeadDim / 2 || lr.LongFactor?.Count != llm.HeadDim / 2))
            r.Problems.Add($"{L}.rope_scaling: short_factor and long_factor need head_dim / 2 = {llm.HeadDim / 2} values each.");
        var config = new InternVLConfig
        {
            Vision = vision, Llm = llm,
            Template = r.String("template", "internlm2-chat"), SystemMessage = r.Has("system_message") ? r.String("system_message") : null, DownsampleRatio = r.Double("downsample_ratio", 0.5),
            ForceImageSize = r.Int("force_image_size", vision.ImageSize), SelectLayer = r.Int("select_layer", -1),
            PsVersion = r.String("ps_version", "v2"), UseThumbnail = r.Bool("use_thumbnail", true),
            MinDynamicPatch = r.Int("min_dynamic_patch", 1), MaxDynamicPatch = r.Int("max_dynamic_patch", DefaultMaxDynamicPatch),
            DynamicImageSize = r.Bool("dynamic_image_size", true),
        };
        if (r.Problems.Count == 0)
        {
            if (llm.HiddenSize % llm.NumAttentionHeads != 0 && !l.Has("head_dim")) r.Problems.Add($"{L}.hidden_size must be divisible by num_attention_heads (or head_dim given).");
            if (llm.HeadDim % 2 != 0) r.Problems.Add($"{L} head_dim {llm.HeadDim} must be even (rotary embedding).");
            if (llm.NumAttentionHeads % llm.NumKeyValueHeads != 0) r.Problems.Add($"{L}.num_attention_heads must be divisible by num_key_value_heads.");
            if (vision.HiddenSize % vision.NumAttentionHeads != 0) r.Problems.Add("vision_config.hidden_size must be divisible by num_attention_heads.");
            if (config.PsVersion != "v2") r.Problems.Add($"ps_version '{config.PsVersion}' is not supported (InternVL2 uses v2).");
        }
        return r.Problems.Count > 0 ? null : config;
    }
}

/// <summary>Reads typed fields of a JSON object, collecting every missing or mistyped required field.</summary>
internal sealed class JsonFields(JsonElement element, string source, string prefix, List<string>? problems = null)
{
    public List<string> Problems { get; } = problems ?? [];

    public bool Has(string name) => element.ValueKind == JsonValueKind.Object && element.TryGetProperty(name, out var e) && e.ValueKind != JsonValueKind.Null;

    public JsonElement Element(string name) => element.GetProperty(name);

    /// <param name="label">The name messages give the object (default: <paramref name="name"/>).</param>
    public JsonFields Object(string name, string? label = null)
    {
        label ??= name;
        if (Has(name) && element.GetProperty(name).ValueKind == JsonValueKind.Object)
            return new JsonFields(element.GetProperty(name), source, prefix + label + ".", Problems);
        Problems.Add($"required field '{prefix}{label}' (an object) is missing.");
        return new JsonFields(default, source, prefix + label + ".", Problems);
    }

    public int Int(string name, int? fallback = null)
    {
        if (Field(name, "an integer", fallback is null) is not { } e) return fallback ?? 0;
        if (e.ValueKind == JsonValueKind.Number && e.TryGetInt32(out int x)) return x;
        Problems.Add($"field '{prefix}{name}' must be an integer."); return fallback ?? 0;
    }

    public double Double(string name, double? fallback = null)
    {
        if (Field(name, "a number", fallback is null) is not { } e) return fallback ?? 0;
        if (e.ValueKind == JsonValueKind.Number) return e.GetDouble();
        Problems.Add($"field '{prefix}{name}' must be a number."); return fallback ?? 0;
    }

    public string String(string name, string? fallback = null)
    {
        if (Field(name, "a string", fallback is null) is not { } e) return fallback ?? "";
        if (e.ValueKind == JsonValueKind.String) return e.GetString()!;
        Problems.Add($"field '{prefix}{name}' must be a string."); return fallback ?? "";
    }

    public bool Bool(string name, bool? fallback = null)
    {
        if (Field(name, "a boolean", fallback is null) is not { } e) return fallback ?? false;
        // Some HF configs write booleans as 0/1 (e.g. use_backbone_lora).
        if (e.ValueKind is JsonValueKind.True or JsonValueKind.False) return e.GetBoolean();
        if (e.ValueKind == JsonValueKind.Number) return e.GetDouble() != 0;
        Problems.Add($"field '{prefix}{name}' must be a boolean."); return fallback ?? false;
    }

    /// <summary>The field's element, or null when absent (recording a problem if it is required).</summary>
    private JsonElement? Field(string name, string what, bool required)
    {
        if (Has(name)) return element.GetProperty(name);
        if (required) Problems.Add($"required field '{prefix}{name}' ({what}) is missing.");
        return null;
    }

    /// <summary>An integer, or the first of a list of them (generation configs and some llm_configs list several EOS ids).</summary>
    public int IntOrFirst(string name, int fallback)
    {
        if (!Has(name)) return fallback;
        var e = element.GetProperty(name);
        if (e.ValueKind == JsonValueKind.Array && e.GetArrayLength() > 0 && e[0].TryGetInt32(out int first)) return first;
        return Int(name, fallback);
    }

    public IReadOnlyList<double> DoubleArray(string name)
    {
        if (Field(name, "a list of numbers", required: true) is not { } e) return [];
        if (e.ValueKind == JsonValueKind.Array && e.EnumerateArray().All(x => x.ValueKind == JsonValueKind.Number))
            return e.EnumerateArray().Select(x => x.GetDouble()).ToList();
        Problems.Add($"field '{prefix}{name}' must be a list of numbers."); return [];
    }

    public string StringArrayFirst(string name)
    {
        var e = element.GetProperty(name);
        if (e.ValueKind == JsonValueKind.Array && e.GetArrayLength() > 0 && e[0].ValueKind == JsonValueKind.String) return e[0].GetString()!;
        if (e.ValueKind == JsonValueKind.String) return e.GetString()!;
        Problems.Add($"field '{prefix}{name}' must be a list of strings."); return "";
    }

}
