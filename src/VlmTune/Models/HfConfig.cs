using System.Text.Json;
using System.Text.Json.Nodes;

namespace VlmTune.Models;

/// <summary>How a model folder names its config fields and weights.</summary>
public enum CheckpointLayout
{
    /// <summary>InternVL's own <c>InternVLChatModel</c> (remote code): <c>llm_config</c>, <c>vision_model.*</c>, <c>mlp1.*</c>, <c>language_model.*</c>.</summary>
    Official,
    /// <summary>transformers' <c>InternVLForConditionalGeneration</c> (the <c>-hf</c> repos): <c>text_config</c>, <c>model.vision_tower.*</c>, <c>lm_head.weight</c>.</summary>
    Hf,
}

/// <summary>
/// config.json in the Hugging Face-native InternVL layout (transformers' <c>InternVLForConditionalGeneration</c>, as
/// <c>models/internvl/convert_internvl_weights_to_hf.py</c> writes it), translated both ways to the official
/// InternVLChatConfig. <see cref="InternVLConfig"/> reads either layout through it; the weight names of the layout are
/// <c>Checkpoints/HfLayout.cs</c>'s. See docs/merge.md.
/// </summary>
public static class HfConfig
{
    public const string Architecture = "InternVLForConditionalGeneration";
    public const string ModelType = "internvl";

    /// <summary>
    /// The hf config has no template field (transformers prompts with the tokenizer's chat_template). Every checkpoint the
    /// converter knows (InternVL2.5 and 3, Qwen2 or InternLM2.5/3 as Llama) and InternVL3.5 (Qwen3) were trained with
    /// internvl2_5, so a folder in this layout is read with it.
    /// </summary>
    public const string InferredTemplate = "internvl2_5";

    /// <summary>text_config.model_type ↔ the official llm_config.architectures[0]. InternLM2 is written as "llama".</summary>
    private static readonly (string ModelType, string Architecture)[] TextModels =
    [
        ("qwen2", LlmArchitectures.Qwen2),
        ("qwen3", LlmArchitectures.Qwen3),
        ("llama", LlmArchitectures.Llama),
        ("phi3",  LlmArchitectures.Phi3),
    ];

    /// <summary>vision_config fields whose names differ: official ↔ hf (the converter's get_internvl_config renames).</summary>
    private static readonly (string Official, string Hf)[] VisionRenames =
    [
        ("qkv_bias",           "attention_bias"),
        ("qk_normalization",   "use_qk_norm"),
        ("initializer_factor", "layer_scale_init_value"),
    ];

    /// <summary>llm_config fields the converter drops (its UNNECESSARY_CONFIG_KEYS); InternLM2's "bias" becomes attention_bias.</summary>
    private static readonly string[] DroppedTextFields =
    [
        "_name_or_path", "_attn_implementation_autoset", "auto_map", "use_bfloat16", "use_flash_attn", "bias", "laux_allreduce",
        "moe_coeff_ratio", "moe_intermediate_size", "moe_output_scale", "noisy_gate_policy", "shared_expert_intermediate_size",
        "use_residual", "use_moe", "use_rts", "use_weighted_residual", "moe_config", "num_experts", "num_routed_experts",
        "num_shared_experts", "capacity_factor", "eval_capacity_factor", "drop_path_rate", "_commit_hash", "transformers_version",
    ];

    /// <summary>
    /// Generation defaults that remote-code configs of transformers 4.3x serialised into llm_config; transformers 5 keeps
    /// them in generation_config.json only, so they are left out of text_config (their values are the defaults).
    /// </summary>
    private static readonly string[] GenerationFields =
    [
        "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
        "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
        "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
        "suppress_tokens", "begin_suppress_tokens",
    ];

    /// <summary>
    /// The defaults of transformers' config classes for the fields VlmTune reads. save_pretrained writes only what
    /// differs from them (to_diff_dict, recursively into the sub-configs), so a released hf config.json may leave out
    /// e.g. InternViT-300M's hidden_size of 1024; a missing field means transformers' default, not VlmTune's.
    /// </summary>
    private static readonly Dictionary<string, (string Field, JsonNode Value)[]> Defaults = new()
    {
        ["internvl"] =
        [
            ("image_token_id", 151667), ("image_seq_length", 256), ("downsample_ratio", 0.5), ("projector_hidden_act", "gelu"),
            ("vision_feature_layer", -1), ("vision_feature_select_strategy", "default"),
        ],
        ["internvl_vision"] =
        [
            ("hidden_size", 1024), ("num_hidden_layers", 24), ("num_attention_heads", 16), ("intermediate_size", 4096),
            ("attention_bias", false), ("use_qk_norm", false), ("hidden_act", "gelu"), ("norm_type", "layer_norm"),
            ("layer_norm_eps", 1e-6), ("image_size", 448), ("patch_size", 14), ("num_channels", 3), ("use_mask_token", false),
            ("use_absolute_position_embeddings", true), ("use_mean_pooling", true), ("layer_scale_init_value", 0.1),
        ],
        ["qwen2"] =
        [
            ("vocab_size", 151936), ("hidden_size", 4096), ("intermediate_size", 22016), ("num_hidden_layers", 32),
            ("num_attention_heads", 32), ("num_key_value_heads", 32), ("hidden_act", "silu"), ("max_position_embeddings", 32768),
            ("rms_norm_eps", 1e-6), ("rope_theta", 10000.0), ("tie_word_embeddings", false), ("use_sliding_window", false),
        ],
        ["qwen3"] =
        [
            ("vocab_size", 151936), ("hidden_size", 4096), ("intermediate_size", 22016), ("num_hidden_layers", 32),
            ("num_attention_heads", 32), ("num_key_value_heads", 32), ("head_dim", 128), ("hidden_act", "silu"),
            ("max_position_embeddings", 32768), ("rms_norm_eps", 1e-6), ("rope_theta", 10000.0), ("tie_word_embeddings", false),
            ("attention_bias", false), ("use_sliding_window", false),
        ],
        ["llama"] =
        [
            ("vocab_size", 32000), ("hidden_size", 4096), ("intermediate_size", 11008), ("num_hidden_layers", 32),
            ("num_attention_heads", 32), ("hidden_act", "silu"), ("max_position_embeddings", 2048), ("rms_norm_eps", 1e-6),
            ("rope_theta", 10000.0), ("tie_word_embeddings", false), ("attention_bias", false), ("mlp_bias", false),
            ("bos_token_id", 1), ("eos_token_id", 2),
        ],
        ["phi3"] =
        [
            ("vocab_size", 32064), ("hidden_size", 3072), ("intermediate_size", 8192), ("num_hidden_layers", 32),
            ("num_attention_heads", 32), ("hidden_act", "silu"), ("max_position_embeddings", 4096),
            ("original_max_position_embeddings", 4096), ("rms_norm_eps", 1e-5), ("rope_theta", 10000.0),
            ("tie_word_embeddings", false), ("bos_token_id", 1), ("eos_token_id", 32000),
        ],
    };

    /// <summary>InternVL's image normalisation (build_transform's IMAGENET_MEAN / IMAGENET_STD).</summary>
    private static readonly double[] ImageMean = [0.485, 0.456, 0.406], ImageStd = [0.229, 0.224, 0.225];

    /// <summary>Whether a config.json is in this layout: model_type "internvl" or architectures InternVLForConditionalGeneration.</summary>
    public static bool IsHfConfig(JsonElement root) =>
        root.ValueKind == JsonValueKind.Object &&
        ((root.TryGetProperty("model_type", out var t) && t.ValueKind == JsonValueKind.String && t.GetString() == ModelType) ||
         (root.TryGetProperty("architectures", out var a) && a.ValueKind == JsonValueKind.Array && a.GetArrayLength() > 0 &&
          a[0].ValueKind == JsonValueKind.String && a[0].GetString() == Architecture));

    /// <summary>
    /// An hf config.json (and the folder's preprocessor_config.json, when <paramref name="modelDir"/> has one) as the
    /// official InternVLChatConfig JSON that means the same model; problems are collected, not thrown.
    /// </summary>
    public static JsonObject ToOfficialConfig(JsonElement hf, string? modelDir, List<string> problems)
    {
        var root = (JsonObject)JsonNode.Parse(hf.GetRawText())!;
        FillDefaults(root, "internvl");
        var text = SubConfig(root, "text_config", problems);
        var vision = SubConfig(root, "vision_config", problems);

        string modelType = text["model_type"] is JsonValue mt && mt.TryGetValue<string>(out var s) ? s : "qwen2";   // transformers' default
        string? arch = TextModels.FirstOrDefault(m => m.ModelType == modelType).Architecture;
        if (arch is null)
            problems.Add($"text_config.model_type '{modelType}' is not supported (supported: {string.Join(", ", TextModels.Select(m => m.ModelType))}).");
        else
        {
            FillDefaults(text, modelType);
            bool textTied = Bool(text, "tie_word_embeddings", "text_config", problems);
            if (root["tie_word_embeddings"] is JsonValue top && top.GetValueKind() is JsonValueKind.True or JsonValueKind.False && top.GetValue<bool>() != textTied)
                problems.Add($"tie_word_embeddings is {Lower(top.GetValue<bool>())} but text_config.tie_word_embeddings is {Lower(textTied)}; transformers 5 ties the head by the first, the LLM by the second: make them agree.");
        }
        text["architectures"] = new JsonArray(arch ?? modelType);
        if (text["rope_parameters"] is JsonObject rope) FromRopeParameters(text, rope);

        FillDefaults(vision, "internvl_vision");
        foreach (var (officialName, hfName) in VisionRenames)
        {
            if (hfName != "layer_scale_init_value") Bool(vision, hfName, "vision_config", problems);
            vision[officialName] = vision[hfName]?.DeepClone();
            vision.Remove(hfName);
        }
        Require(vision, "use_mask_token", false, "InternViT has no mask token", problems);
        Require(vision, "use_absolute_position_embeddings", true, "InternViT adds absolute position embeddings", problems);
        Require(vision, "use_mean_pooling", true, "InternVL projects every patch feature, with no pooling layer norm", problems);
        foreach (var hfOnly in new[] { "use_mask_token", "use_absolute_position_embeddings", "use_mean_pooling", "projection_dropout", "hidden_dropout_prob" })
            vision.Remove(hfOnly);
        vision["image_size"] = Square(vision, "image_size", problems);
        vision["patch_size"] = Square(vision, "patch_size", problems);
        vision["architectures"] = new JsonArray("InternVisionModel");
        vision["model_type"] = "intern_vit_6b";

        if (root["vision_feature_layer"] is not JsonValue layer || layer.GetValueKind() != JsonValueKind.Number)
            problems.Add("vision_feature_layer must be one integer (InternVL reads one ViT layer).");
        if (Str(root, "vision_feature_select_strategy") != "default")
            problems.Add($"vision_feature_select_strategy '{Str(root, "vision_feature_select_strategy")}' is not supported (InternVL drops the CLS token: \"default\").");
        if (Str(root, "projector_hidden_act") != "gelu")
            problems.Add($"projector_hidden_act '{Str(root, "projector_hidden_act")}' is not supported (InternVL's mlp1 uses \"gelu\").");

        var (minTiles, maxTiles) = PreprocessorTiling(modelDir, problems);
        var official = new JsonObject
        {
            ["architectures"] = new JsonArray("InternVLChatModel"),
            ["model_type"] = "internvl_chat",
            ["template"] = InferredTemplate,
            ["llm_config"] = text.DeepClone(),
            ["vision_config"] = vision.DeepClone(),
            ["downsample_ratio"] = root["downsample_ratio"]?.DeepClone(),
            ["select_layer"] = root["vision_feature_layer"]?.DeepClone(),
            ["force_image_size"] = vision["image_size"]?.DeepClone(),
            ["ps_version"] = "v2",                      // transformers' pixel_shuffle is InternVL's v2
            ["dynamic_image_size"] = true,              // InternVLProcessor always crops to patches, with a thumbnail
            ["use_thumbnail"] = true,
            ["min_dynamic_patch"] = minTiles,
            ["max_dynamic_patch"] = maxTiles,
            ["use_backbone_lora"] = 0,
            ["use_llm_lora"] = 0,
        };
        foreach (var dtypeField in new[] { "torch_dtype", "dtype" })
            if (root[dtypeField] is { } d) { official["torch_dtype"] = d.DeepClone(); break; }
        return official;
    }

    /// <summary>
    /// Checks an hf config against the model it was translated into, and its image_token_id against the folder's
    /// tokenizer: transformers puts image features at image_token_id, VlmTune at the tokenizer's &lt;IMG_CONTEXT&gt;.
    /// </summary>
    internal static void CheckParsed(JsonElement hf, InternVLConfig config, string? modelDir, List<string> problems)
    {
        int imageToken = hf.TryGetProperty("image_token_id", out var t) && t.ValueKind == JsonValueKind.Number && t.TryGetInt32(out var id) ? id : 151667;
        if (modelDir is not null && File.Exists(Path.Combine(modelDir, "tokenizer_config.json")))
        {
            int? context = null;
            try { context = VlmTune.Text.TokenizerFileConfig.Read(modelDir).AddedTokens.TryGetValue("<IMG_CONTEXT>", out var c) ? c : null; }
            catch (VlmTuneException) { }   // broken tokenizer files are reported when the tokenizer loads
            if (context is { } expected && expected != imageToken)
                problems.Add($"image_token_id is {imageToken}, but the tokenizer's <IMG_CONTEXT> is {expected}; transformers would place the image features elsewhere than VlmTune.");
        }
        int seq = hf.TryGetProperty("image_seq_length", out var s) && s.ValueKind == JsonValueKind.Number && s.TryGetInt32(out var v) ? v : 256;
        if (seq != config.NumImageToken)
            problems.Add($"image_seq_length is {seq}, but (image_size / patch_size)² × downsample_ratio² gives {config.NumImageToken} image tokens per tile.");
    }

    /// <summary>
    /// The hf config.json for an official one, as the converter's get_internvl_config builds it: text_config is the
    /// llm_config less the fields transformers does not know (InternLM2 as a Llama config), vision_config has every
    /// InternVLVisionConfig field written out (its defaults differ from InternViT's: norm_type, attention_bias).
    /// </summary>
    /// <param name="imageTokenId">The tokenizer's &lt;IMG_CONTEXT&gt; id (the converter's image_token_id).</param>
    /// <param name="dtype">The stored dtype's config name ("bfloat16"…); null keeps the official config's.</param>
    public static JsonObject ToHfConfig(JsonObject official, InternVLConfig config, int imageTokenId, string? dtype)
    {
        var llm = (JsonObject)official["llm_config"]!.DeepClone();
        var visionIn = official["vision_config"] as JsonObject ?? [];
        foreach (var field in DroppedTextFields.Concat(GenerationFields)) llm.Remove(field);
        bool internLm = config.Llm.Architecture == LlmArchitectures.InternLM2;
        string modelType = internLm ? "llama" : TextModels.First(m => m.Architecture == config.Llm.Architecture).ModelType;
        llm["model_type"] = modelType;
        llm["architectures"] = new JsonArray(internLm ? LlmArchitectures.Llama : config.Llm.Architecture);
        if (internLm) llm["attention_bias"] = config.Llm.Bias;      // InternLM2's bias is on wqkv and wo: q/k/v/o in Llama
        if (llm["rope_scaling"] is JsonObject rs && rs["type"] is JsonValue t && t.TryGetValue<string>(out var type) && type == "su")
            rs["type"] = "longrope";                                 // Phi-3's old name; transformers validates "longrope"
        llm["use_cache"] = true;
        llm["tie_word_embeddings"] = config.Llm.TieWordEmbeddings;
        if (dtype is not null) llm["torch_dtype"] = dtype;

        var v = config.Vision;
        var vision = new JsonObject
        {
            ["model_type"] = "internvl_vision",
            ["hidden_size"] = v.HiddenSize,
            ["num_hidden_layers"] = v.NumHiddenLayers,
            ["num_attention_heads"] = v.NumAttentionHeads,
            ["intermediate_size"] = v.IntermediateSize,
            ["hidden_act"] = v.HiddenAct,
            ["norm_type"] = v.NormType,
            ["layer_norm_eps"] = Float(v.LayerNormEps),
            ["image_size"] = new JsonArray(v.ImageSize, v.ImageSize),
            ["patch_size"] = new JsonArray(v.PatchSize, v.PatchSize),
            ["num_channels"] = v.NumChannels,
            ["attention_bias"] = v.QkvBias,
            ["use_qk_norm"] = v.QkNormalization,
            ["layer_scale_init_value"] = Float(v.InitializerFactor),
            ["attention_dropout"] = Float(Number(visionIn, "attention_dropout", 0.0)),
            ["projection_dropout"] = Float(Number(visionIn, "attention_dropout", 0.0)),
            ["hidden_dropout_prob"] = Float(0.0),
            ["initializer_range"] = Float(Number(visionIn, "initializer_range", 0.02)),
            ["use_absolute_position_embeddings"] = true,
            ["use_mask_token"] = false,
            ["use_mean_pooling"] = true,
        };
        if (dtype is not null) vision["torch_dtype"] = dtype;

        var hf = new JsonObject
        {
            ["architectures"] = new JsonArray(Architecture),
            ["model_type"] = ModelType,
            ["text_config"] = llm,
            ["vision_config"] = vision,
            ["image_token_id"] = imageTokenId,
            ["image_seq_length"] = config.NumImageToken,
            ["downsample_ratio"] = Float(config.DownsampleRatio),
            ["projector_hidden_act"] = "gelu",
            ["vision_feature_layer"] = config.SelectLayer,
            ["vision_feature_select_strategy"] = "default",
            // transformers 5 ties lm_head by this top-level flag (default true), 4.x by the text config's: write both.
            ["tie_word_embeddings"] = config.Llm.TieWordEmbeddings,
        };
        hf["torch_dtype"] = dtype is not null ? JsonValue.Create(dtype) : official["torch_dtype"]?.DeepClone();
        return hf;
    }

    /// <summary>
    /// preprocessor_config.json as the converter's write_image_processor saves it (GotOcr2ImageProcessorFast: resize to the
    /// tile size, rescale, ImageNet normalisation), with the folder's tiling limits, which InternVLProcessor applies.
    /// </summary>
    public static JsonObject PreprocessorConfig(InternVLConfig config) => new()
    {
        ["image_processor_type"] = "GotOcr2ImageProcessorFast",
        ["processor_class"] = "InternVLProcessor",
        ["do_resize"] = true,
        ["size"] = new JsonObject { ["height"] = config.ForceImageSize, ["width"] = config.ForceImageSize },
        ["resample"] = 3,                                   // PIL bicubic, as build_transform
        ["do_rescale"] = true,
        ["rescale_factor"] = 1 / 255.0,
        ["do_normalize"] = true,
        ["image_mean"] = new JsonArray(ImageMean.Select(x => (JsonNode)x).ToArray()),
        ["image_std"] = new JsonArray(ImageStd.Select(x => (JsonNode)x).ToArray()),
        ["do_convert_rgb"] = true,
        ["crop_to_patches"] = config.DynamicImageSize,
        ["min_patches"] = config.MinDynamicPatch,
        ["max_patches"] = config.MaxDynamicPatch,
    };

    /// <summary>processor_config.json as InternVLProcessor.save_pretrained writes it.</summary>
    public static JsonObject ProcessorConfig(InternVLConfig config) => new()
    {
        ["image_seq_length"] = config.NumImageToken,
        ["processor_class"] = "InternVLProcessor",
    };

    /// <summary>min_patches / max_patches of the folder's preprocessor_config.json (GotOcr2ImageProcessor's defaults 1 and 12).</summary>
    private static (int Min, int Max) PreprocessorTiling(string? modelDir, List<string> problems)
    {
        string? path = modelDir is null ? null : Path.Combine(modelDir, "preprocessor_config.json");
        if (path is null || !File.Exists(path)) return (1, 12);
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            int Read(string field, int fallback)
            {
                if (!doc.RootElement.TryGetProperty(field, out var e) || e.ValueKind == JsonValueKind.Null) return fallback;
                if (e.ValueKind == JsonValueKind.Number && e.TryGetInt32(out var x) && x > 0) return x;
                problems.Add($"{path}: field '{field}' must be a positive integer."); return fallback;
            }
            return (Read("min_patches", 1), Read("max_patches", 12));
        }
        catch (JsonException e) { problems.Add($"{path}: invalid JSON: {e.Message}"); return (1, 12); }
    }

    private static JsonObject SubConfig(JsonObject root, string name, List<string> problems)
    {
        if (root[name] is JsonObject o) return o;
        problems.Add($"required field '{name}' (an object) is missing.");
        var empty = new JsonObject();
        root[name] = empty;
        return empty;
    }

    private static void FillDefaults(JsonObject config, string configClass)
    {
        foreach (var (field, value) in Defaults[configClass])
            if (config[field] is null) config[field] = value.DeepClone();
    }

    /// <summary>transformers 5's rope_parameters (rope_type, rope_theta, factor…) as the rope_theta / rope_scaling of 4.x and InternVL.</summary>
    private static void FromRopeParameters(JsonObject text, JsonObject rope)
    {
        if (rope["rope_theta"] is { } theta) text["rope_theta"] = theta.DeepClone();
        if (rope["original_max_position_embeddings"] is { } original && text["original_max_position_embeddings"] is null)
            text["original_max_position_embeddings"] = original.DeepClone();
        string type = Str(rope, "rope_type") ?? Str(rope, "type") ?? "default";
        if (type == "default") { text.Remove("rope_scaling"); }
        else
        {
            var scaling = (JsonObject)rope.DeepClone();
            scaling.Remove("rope_theta");
            scaling["type"] = type;
            text["rope_scaling"] = scaling;
        }
        text.Remove("rope_parameters");
    }

    private static JsonNode? Square(JsonObject vision, string field, List<string> problems)
    {
        var node = vision[field];
        if (node is JsonValue one && one.TryGetValue<int>(out _)) return one.DeepClone();
        if (node is JsonArray { Count: 2 } pair && pair[0] is JsonValue h && pair[1] is JsonValue w
            && h.TryGetValue<int>(out var hv) && w.TryGetValue<int>(out var wv))
        {
            if (hv == wv) return hv;
            problems.Add($"vision_config.{field} [{hv}, {wv}] is not square (InternViT's tiles and patches are).");
            return hv;
        }
        problems.Add($"field 'vision_config.{field}' must be an integer or a [height, width] pair.");
        return node?.DeepClone();
    }

    private static bool Bool(JsonObject o, string field, string section, List<string> problems)
    {
        if (o[field] is JsonValue v && v.GetValueKind() is JsonValueKind.True or JsonValueKind.False) return v.GetValue<bool>();
        problems.Add($"field '{section}.{field}' must be a boolean.");
        return false;
    }

    private static void Require(JsonObject vision, string field, bool expected, string why, List<string> problems)
    {
        if (Bool(vision, field, "vision_config", problems) != expected)
            problems.Add($"vision_config.{field} is {Lower(!expected)}; VlmTune needs {Lower(expected)} ({why}).");
    }

    /// <summary>
    /// A float that reads back as a Python float: System.Text.Json writes 1.0 as "1", which json.loads makes an int, and
    /// transformers 5's strict config dataclasses check the declared types.
    /// </summary>
    private static JsonNode Float(double x)
    {
        string text = x.ToString("R", System.Globalization.CultureInfo.InvariantCulture);
        return JsonNode.Parse(text.Contains('.') || text.Contains('E') ? text : text + ".0")!;
    }

    private static double Number(JsonObject o, string field, double fallback) =>
        o[field] is JsonValue v && v.TryGetValue<double>(out var x) ? x : fallback;

    private static string? Str(JsonObject o, string field) => o[field] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;

    private static string Lower(bool b) => b ? "true" : "false";
}
