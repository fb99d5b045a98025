using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using TorchSharp;
using VlmTune.Checkpoints;
using VlmTune.Models;
using VlmTune.Tests.Support;
using static TorchSharp.torch;
using VlmTune.Data;

namespace VlmTune.Tests.Checkpoints;

/// <summary>
/// The Hugging Face layout (InternVLForConditionalGeneration): <c>merge --layout hf</c> writes the names and config of
/// transformers' converter, the folder loads back to the official merge's logits, an hf base merges back to the
/// official layout, and bad folders fail with one line naming the key or field.
/// </summary>
public sealed class HfLayoutTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vlmtune-hf-").FullName;

    public void Dispose()
    {
        try { Directory.Delete(_dir, true); } catch (IOException) { }
    }

    private string Out(string name) => Path.Combine(_dir, name);

    /// <summary>The tiny InternLM2 fixture (shared) or a family fixture (tests/fixtures/families).</summary>
    private static string BaseOf(string variant) => variant == "internlm2" ? Fixtures.TinyModel : FamilyFixtures.ModelDir(variant);

    private static string AdapterOf(string variant) => variant == "internlm2" ? Fixtures.Adapter : FamilyFixtures.AdapterDir(variant);

    private static MergeResult Merge(string baseDir, string adapter, string outDir, CheckpointLayout layout, long maxShard = ModelMerger.DefaultMaxShardBytes) =>
        ModelMerger.Merge(new MergeOptions
        {
            BaseDir = baseDir, AdapterDir = adapter, OutDir = outDir, Layout = layout, Verify = null, MaxShardBytes = maxShard,
        });

    private static int ImageContextId(string dir)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "added_tokens.json")));
        return doc.RootElement.GetProperty("<IMG_CONTEXT>").GetInt32();
    }

    /// <summary>Logits (T, V) in fp32 of a prompt with one random tile: text, &lt;img&gt;, 256 image tokens, &lt;/img&gt;, text.</summary>
    private static Tensor Logits(string dir, int imageContextId)
    {
        using var scope = NewDisposeScope();
        using var model = InternVLModelLoader.Load(dir, new ModelOptions { Attention = AttentionKind.Exact });
        using var noGrad = no_grad();
        long[] ids = [.. new long[] { 11, 22, 33, imageContextId - 2 }, .. Enumerable.Repeat((long)imageContextId, 256), imageContextId - 1, 44, 55, 66];
        var pixels = randn([1, 3, 448, 448], generator: new Generator(7));
        var features = model.ExtractFeatures(pixels);
        var embeds = model.EmbedWithImages(tensor(ids).unsqueeze(0), features, imageContextId);
        var hidden = model.language_model.Forward(embeds, new DecoderInputs());
        return model.language_model.Logits(hidden)[0].to_type(ScalarType.Float32).MoveToOuterDisposeScope();
    }

    private static double MaxDiff(Tensor a, Tensor b) => (a - b).abs().max().item<float>();

    private static Dictionary<string, long[]> StoredShapes(string dir)
    {
        using var f = CheckpointFolder.Open(dir);
        return f.Names.ToDictionary(n => n, n => f.Entry(n).Shape);
    }

    private static JsonObject Json(string path) => JsonNode.Parse(File.ReadAllText(path))!.AsObject();

    /// <summary>
    /// transformers' convert_internvl_weights_to_hf.py, transliterated: its regex tables applied in order, its qkv / wqkv
    /// renames, then InternVLForConditionalGeneration._checkpoint_conversion_mapping, which gives the names the model
    /// holds (and transformers 5 saves). Deliberately not VlmTune's table, so the two are checked against each other.
    /// </summary>
    private static class Converter
    {
        private static readonly (string Pattern, string Replacement)[] Vision =
        [
            ("vision_model", "vision_tower"), ("layers", "layer"), ("class_embedding", "cls_token"),
            ("position_embedding", "position_embeddings"), ("patch_embedding", "patch_embeddings.projection"),
            (@"ls(\d+)", "lambda_$1"), ("attn.proj", "attention.projection_layer"), ("attn.dropout", "attention.projection_dropout"),
            ("attn", "attention"), ("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
        ];
        private static readonly (string Pattern, string Replacement)[] TextLlama =
        [
            ("tok_embeddings", "embed_tokens"), ("attention.wo", "self_attn.o_proj"), ("feed_forward.w1", "mlp.gate_proj"),
            ("feed_forward.w2", "mlp.down_proj"), ("feed_forward.w3", "mlp.up_proj"), ("attention_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"), ("output", "lm_head"),
        ];
        private static readonly (string Pattern, string Replacement)[] Multi =
        [
            ("mlp1.0", "multi_modal_projector.layer_norm"), ("mlp1.1", "multi_modal_projector.linear_1"), ("mlp1.3", "multi_modal_projector.linear_2"),
        ];
        private static readonly (string Pattern, string Replacement)[] ConversionMapping =
        [
            ("^language_model.model", "model.language_model"), ("^vision_tower", "model.vision_tower"),
            ("^multi_modal_projector", "model.multi_modal_projector"), ("^language_model.lm_head", "lm_head"),
        ];

        public static List<string> Names(IEnumerable<string> official, bool llamaText)
        {
            var names = new List<string>();
            foreach (var key in official)
            {
                var table = key.StartsWith("vision_model", StringComparison.Ordinal) ? Vision
                    : key.StartsWith("language_model", StringComparison.Ordinal) ? (llamaText ? TextLlama : [])
                    : Multi;
                string newKey = table.Aggregate(key, (k, r) => Regex.Replace(k, r.Pattern, r.Replacement));
                if (key.Contains("attn.qkv"))
                    names.AddRange(new[] { "q_proj", "k_proj", "v_proj" }.Select(p => newKey.Replace("attention.qkv", "attention." + p)));
                else if (key.Contains("attention.wqkv"))
                    names.AddRange(new[] { "q_proj", "k_proj", "v_proj" }.Select(p => newKey.Replace("attention.wqkv", "self_attn." + p)));
                else names.Add(newKey);
            }
            return names.Select(n => ConversionMapping.Aggregate(n, (k, r) => Regex.Replace(k, r.Pattern, r.Replacement))).Order(StringComparer.Ordinal).ToList();
        }
    }

    [FixtureTheory]
    [InlineData("qwen2")]
    [InlineData("qwen3")]
    [InlineData("internlm2")]
    public void HfMergeHasTheConvertersNamesAndLoadsToTheOfficialMergesLogits(string variant)
    {
        using var scope = NewDisposeScope();
        Merge(BaseOf(variant), AdapterOf(variant), Out("official"), CheckpointLayout.Official);
        var hf = Merge(BaseOf(variant), AdapterOf(variant), Out("hf"), CheckpointLayout.Hf);

        var official = StoredShapes(Out("official"));
        var stored = StoredShapes(Out("hf"));
        Assert.Equal(Converter.Names(official.Keys, llamaText: variant == "internlm2"), stored.Keys.Order(StringComparer.Ordinal).ToList());
        Assert.Equal(stored.Count, hf.Tensors);
        // The ViT's fused qkv is three hidden × hidden projections; InternLM2's wqkv (4 query heads, 2 KV heads of 16) splits by head group.
        Assert.Equal(new long[] { 64, 64 }, stored["model.vision_tower.encoder.layer.1.attention.v_proj.weight"]);
        Assert.Equal(new long[] { 64 }, stored["model.vision_tower.encoder.layer.0.attention.k_proj.bias"]);
        if (variant == "internlm2")
        {
            Assert.Equal(new long[] { 64, 64 }, stored["model.language_model.layers.0.self_attn.q_proj.weight"]);
            Assert.Equal(new long[] { 32, 64 }, stored["model.language_model.layers.0.self_attn.k_proj.weight"]);
        }
        // The converter's cuts: q = qkv[:dim], k = qkv[dim:2dim], v = qkv[-dim:]; InternLM2's k = wqkv rows (h, groups, ·).
        using (var a = CheckpointFolder.Open(Out("official")))
        using (var b = CheckpointFolder.Open(Out("hf")))
        {
            var qkv = a.Read("vision_model.encoder.layers.1.attn.qkv.weight");
            Assert.True(Same(qkv[..64], b.Read("model.vision_tower.encoder.layer.1.attention.q_proj.weight")));
            Assert.True(Same(qkv[64..128], b.Read("model.vision_tower.encoder.layer.1.attention.k_proj.weight")));
            Assert.True(Same(qkv[^64..], b.Read("model.vision_tower.encoder.layer.1.attention.v_proj.weight")));
            if (variant == "internlm2")
            {
                // 2 KV heads of 16, 2 query heads each: rows per KV head are q, q, k, v.
                var wqkv = a.Read("language_model.model.layers.1.attention.wqkv.weight");
                var k = b.Read("model.language_model.layers.1.self_attn.k_proj.weight");
                var q = b.Read("model.language_model.layers.1.self_attn.q_proj.weight");
                Assert.True(Same(cat([wqkv[32..48], wqkv[96..112]], 0), k));
                Assert.True(Same(cat([wqkv[..32], wqkv[64..96]], 0), q));
            }
        }
        // Qwen3 ties its head: no lm_head in either layout, and the loaded model keeps it tied.
        Assert.Equal(variant != "qwen3", stored.ContainsKey("lm_head.weight"));

        int imageContext = ImageContextId(BaseOf(variant));
        var expected = Logits(Out("official"), imageContext);
        var actual = Logits(Out("hf"), imageContext);
        if (variant == "internlm2")
        {
            // Loaded back as a Llama model: separate q/k/v products round differently from the fused one.
            Assert.True(MaxDiff(expected, actual) <= 1e-4, $"max |Δ| {MaxDiff(expected, actual)}");
            Assert.Equal(expected.argmax(-1).data<long>().ToArray(), actual.argmax(-1).data<long>().ToArray());
        }
        else Assert.Equal(0.0, MaxDiff(expected, actual));   // the same modules on the same stored values

        using var model = InternVLModelLoader.Load(Out("hf"), new ModelOptions());
        Assert.Equal(CheckpointLayout.Hf, model.Config.Layout);
        Assert.Equal(variant == "qwen3", model.Config.Llm.TieWordEmbeddings);
        Assert.Equal(variant == "qwen3" ? null : "lm_head", model.language_model.OutputHeadName);
        string architecture = variant switch { "qwen2" => LlmArchitectures.Qwen2, "qwen3" => LlmArchitectures.Qwen3, _ => LlmArchitectures.Llama };
        Assert.Equal(architecture, model.Config.Llm.Architecture);      // InternLM2 comes back as the Llama it was written as
        Assert.Equal(HfConfig.InferredTemplate, model.Config.Template);
    }

    [FixtureTheory]
    [InlineData("qwen2")]
    [InlineData("qwen3")]
    [InlineData("internlm2")]
    public void HfConfigHasEveryFieldTransformersReads(string variant)
    {
        Merge(BaseOf(variant), AdapterOf(variant), Out("hf"), CheckpointLayout.Hf);
        var config = Json(Path.Combine(Out("hf"), "config.json"));
        var baseConfig = Json(Path.Combine(BaseOf(variant), "config.json"));

        // configuration_internvl.py: InternVLConfig's fields, InternVLVisionConfig's fields.
        Assert.Equal(HfConfig.Architecture, config["architectures"]![0]!.GetValue<string>());
        Assert.Equal("internvl", config["model_type"]!.GetValue<string>());
        foreach (var field in new[] { "text_config", "vision_config", "image_token_id", "image_seq_length", "downsample_ratio",
                                      "projector_hidden_act", "vision_feature_layer", "vision_feature_select_strategy", "tie_word_embeddings" })
            Assert.True(config.ContainsKey(field), field);
        var vision = config["vision_config"]!.AsObject();
        foreach (var field in new[] { "hidden_size", "num_hidden_layers", "num_attention_heads", "attention_bias", "use_qk_norm",
                                      "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_dropout", "projection_dropout",
                                      "initializer_range", "norm_type", "layer_norm_eps", "image_size", "patch_size", "num_channels",
                                      "use_mask_token", "use_absolute_position_embeddings", "layer_scale_init_value", "use_mean_pooling" })
            Assert.True(vision.ContainsKey(field), "vision_config." + field);
        Assert.Equal("internvl_vision", vision["model_type"]!.GetValue<string>());
        // InternVLVisionConfig defaults to layer_norm and no q/k/v bias; InternViT's values are written out.
        Assert.Equal(baseConfig["vision_config"]!["norm_type"]!.GetValue<string>(), vision["norm_type"]!.GetValue<string>());
        Assert.Equal(baseConfig["vision_config"]!["qkv_bias"]!.GetValue<bool>(), vision["attention_bias"]!.GetValue<bool>());
        Assert.False(vision["use_qk_norm"]!.GetValue<bool>());
        Assert.Equal(new[] { 448, 448 }, vision["image_size"]!.AsArray().Select(n => n!.GetValue<int>()));
        Assert.Equal(ImageContextId(BaseOf(variant)), config["image_token_id"]!.GetValue<int>());
        Assert.Equal(256, config["image_seq_length"]!.GetValue<int>());
        Assert.Equal(-1, config["vision_feature_layer"]!.GetValue<int>());

        var text = config["text_config"]!.AsObject();
        Assert.Equal(variant == "internlm2" ? "llama" : variant, text["model_type"]!.GetValue<string>());
        bool tied = variant == "qwen3";
        Assert.Equal(tied, config["tie_word_embeddings"]!.GetValue<bool>());
        Assert.Equal(tied, text["tie_word_embeddings"]!.GetValue<bool>());
        foreach (var dropped in new[] { "auto_map", "_name_or_path", "bias", "use_bfloat16", "max_length", "do_sample" })
            Assert.False(text.ContainsKey(dropped), "text_config." + dropped);
        // Floats stay floats for Python (transformers 5 checks the declared types): 1.0, not 1.
        string raw = File.ReadAllText(Path.Combine(Out("hf"), "config.json"));
        Assert.Contains("\"layer_scale_init_value\": 1.0", raw);
        Assert.Contains("\"hidden_dropout_prob\": 0.0", raw);
        if (variant == "internlm2")
        {
            Assert.Equal("LlamaForCausalLM", text["architectures"]![0]!.GetValue<string>());
            Assert.False(text["attention_bias"]!.GetValue<bool>());
            Assert.Equal("dynamic", text["rope_scaling"]!["type"]!.GetValue<string>());
            Assert.Equal(2, text["num_key_value_heads"]!.GetValue<int>());
        }

        // The processor files of the -hf repos; the tokenizer files unchanged; no InternVL remote code.
        var pre = Json(Path.Combine(Out("hf"), "preprocessor_config.json"));
        Assert.Equal("GotOcr2ImageProcessorFast", pre["image_processor_type"]!.GetValue<string>());
        Assert.Equal(448, pre["size"]!["height"]!.GetValue<int>());
        Assert.Equal(12, pre["max_patches"]!.GetValue<int>());
        Assert.Equal(0.485, pre["image_mean"]![0]!.GetValue<double>());
        Assert.Equal(256, Json(Path.Combine(Out("hf"), "processor_config.json"))["image_seq_length"]!.GetValue<int>());
        // tokenizer_config.json gains the template's chat_template (what transformers and vLLM render); the rest is copied.
        foreach (var file in Directory.GetFiles(BaseOf(variant)).Select(Path.GetFileName).Where(f => (f!.StartsWith("tokenizer") || f == "added_tokens.json") && f != "tokenizer_config.json"))
            Assert.Equal(File.ReadAllBytes(Path.Combine(BaseOf(variant), file!)), File.ReadAllBytes(Path.Combine(Out("hf"), file!)));
        var tokenizerConfig = Json(Path.Combine(Out("hf"), "tokenizer_config.json"));
        Assert.False(string.IsNullOrEmpty(tokenizerConfig["chat_template"]?.GetValue<string>()));
        // What transformers' InternVLProcessor reads from the tokenizer (tokenizer.start_image_token, …), and image
        // parts of a message become <IMG_CONTEXT>, the token the processor expands into the image's tiles.
        var named = tokenizerConfig["extra_special_tokens"]!;
        Assert.Equal("<img>", named["start_image_token"]!.GetValue<string>());
        Assert.Equal("</img>", named["end_image_token"]!.GetValue<string>());
        Assert.Equal("<IMG_CONTEXT>", named["context_image_token"]!.GetValue<string>());
        Assert.Contains("{%- set image_placeholder = '<IMG_CONTEXT>' -%}", tokenizerConfig["chat_template"]!.GetValue<string>());
        // The processor's chat template (InternVLProcessor.apply_chat_template reads chat_template.jinja): the same text.
        Assert.Equal(tokenizerConfig["chat_template"]!.GetValue<string>(), File.ReadAllText(Path.Combine(Out("hf"), "chat_template.jinja")));
        Merge(BaseOf(variant), AdapterOf(variant), Out("official"), CheckpointLayout.Official);
        var official = Json(Path.Combine(Out("official"), "tokenizer_config.json"));
        Assert.Null(official["extra_special_tokens"]);
        Assert.Contains("{%- set image_placeholder = '<image>' -%}", official["chat_template"]!.GetValue<string>());
        Assert.False(File.Exists(Path.Combine(Out("official"), "chat_template.jinja")));
        Assert.Empty(Directory.GetFiles(Out("hf"), "modeling_*.py"));
    }

    [FixtureFact]
    public void HfBaseMergesIntoTheSameOfficialFolderAsItsOfficialSource()
    {
        // Qwen2 merged once, in both layouts; merging the same adapter again into each must give one official folder.
        Merge(BaseOf("qwen2"), AdapterOf("qwen2"), Out("official"), CheckpointLayout.Official);
        Merge(BaseOf("qwen2"), AdapterOf("qwen2"), Out("hf"), CheckpointLayout.Hf, maxShard: 2_000_000);   // sharded hf base
        Merge(Out("official"), AdapterOf("qwen2"), Out("again-official"), CheckpointLayout.Official);
        Merge(Out("hf"), AdapterOf("qwen2"), Out("again-from-hf"), CheckpointLayout.Official);
        Merge(Out("hf"), AdapterOf("qwen2"), Out("again-hf"), CheckpointLayout.Hf);

        using (var a = CheckpointFolder.Open(Out("again-official")))
        using (var b = CheckpointFolder.Open(Out("again-from-hf")))
        {
            Assert.Equal(a.Names.Order(StringComparer.Ordinal), b.Names.Order(StringComparer.Ordinal));
            foreach (var name in a.Names)
            {
                using var x = a.Read(name);
                using var y = b.Read(name);
                Assert.True(Same(x, y), name);
            }
        }
        var fromOfficial = InternVLConfig.Load(Out("again-official"));
        var fromHf = InternVLConfig.Load(Out("again-from-hf"));
        Assert.Equal(CheckpointLayout.Official, fromHf.Layout);
        Assert.Equal(fromOfficial.Vision, fromHf.Vision);
        Assert.Equal(fromOfficial.Llm with { RopeScaling = null }, fromHf.Llm with { RopeScaling = null });
        Assert.Equal(fromOfficial with { Vision = null!, Llm = null! }, fromHf with { Vision = null!, Llm = null! });
        Assert.Equal("InternVLChatModel", Json(Path.Combine(Out("again-from-hf"), "config.json"))["architectures"]![0]!.GetValue<string>());

        int imageContext = ImageContextId(BaseOf("qwen2"));
        Assert.Equal(0.0, MaxDiff(Logits(Out("again-official"), imageContext), Logits(Out("again-hf"), imageContext)));
    }

    [FixtureFact]
    public void AnAdapterRunsOnAnHfBaseAsOnTheOfficialOne()
    {
        // An hf copy of the unmerged base: "merge" a trained projector that is the base's own.
        using var scope = NewDisposeScope();
        string same = Out("same-projector");
        Directory.CreateDirectory(same);
        using (var weights = CheckpointFolder.Open(BaseOf("qwen3")))
            SafetensorsWriter.Write(Path.Combine(same, TrainedWeights.FileName), [new("mlp1.1.weight", weights.Read("mlp1.1.weight"))]);
        Merge(BaseOf("qwen3"), same, Out("hf-base"), CheckpointLayout.Hf);

        Tensor LogitsWithAdapter(string dir)
        {
            using var model = InternVLModelLoader.Load(dir, new ModelOptions { Attention = AttentionKind.Exact });
            AdapterLoader.Apply(model, AdapterOf("qwen3"));   // what chat / serve --adapter do
            using var noGrad = no_grad();
            var embeds = model.EmbedWithImages(tensor(new long[] { 1, 2, 3, 4, 5 }).unsqueeze(0), null, ImageContextId(BaseOf("qwen3")));
            return model.language_model.Logits(model.language_model.Forward(embeds, new DecoderInputs()))[0].to_type(ScalarType.Float32);
        }
        Assert.Equal(0.0, MaxDiff(LogitsWithAdapter(BaseOf("qwen3")), LogitsWithAdapter(Out("hf-base"))));
        // The vision-feature cache identifies an hf folder's ViT weights too (by their official names).
        var config = InternVLConfig.Load(Out("hf-base"));
        string before = VlmTune.Data.VisionFeatureCache.Fingerprint(Out("hf-base"), config, ScalarType.Float32);
        string changed = CopyFolder(Out("hf-base"), "hf-changed-vit");
        RewriteWeights(changed, t => t.Select(kv => kv.Key == "model.vision_tower.encoder.layer.0.lambda_1" ? new KeyValuePair<string, Tensor>(kv.Key, kv.Value.to_type(ScalarType.Float32)) : kv));
        Assert.NotEqual(before, VlmTune.Data.VisionFeatureCache.Fingerprint(changed, InternVLConfig.Load(changed), ScalarType.Float32));
    }

    [FixtureFact]
    public void FoldersSavedByTransformers4WithTheOldPrefixesLoadTheSame()
    {
        using var scope = NewDisposeScope();
        Merge(BaseOf("qwen3"), AdapterOf("qwen3"), Out("hf"), CheckpointLayout.Hf);
        string legacy = CopyFolder(Out("hf"), "legacy");
        (string Saved, string Current)[] prefixes =
            [("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."), ("language_model.model.", "model.language_model.")];
        RewriteWeights(legacy, tensors => tensors.Select(kv =>
            new KeyValuePair<string, Tensor>(prefixes.Aggregate(kv.Key, (k, p) => k.StartsWith(p.Current) ? p.Saved + k[p.Current.Length..] : k), kv.Value)));
        Assert.Contains("vision_tower.encoder.layer.0.lambda_1", StoredShapes(legacy).Keys);

        int imageContext = ImageContextId(BaseOf("qwen3"));
        Assert.Equal(0.0, MaxDiff(Logits(Out("hf"), imageContext), Logits(legacy, imageContext)));
    }

    [FixtureFact]
    public void UnknownMissingAndUnexpectedHfTensorsAreNamedInOneError()
    {
        using var scope = NewDisposeScope();
        Merge(BaseOf("qwen2"), AdapterOf("qwen2"), Out("hf"), CheckpointLayout.Hf);
        var options = new ModelOptions();

        string unknown = CopyFolder(Out("hf"), "unknown");
        RewriteWeights(unknown, t => t.Append(new("model.vision_tower.encoder.layer.0.attention.bogus.weight", zeros(2))));
        var e = Assert.Throws<CheckpointException>(() => InternVLModelLoader.Load(unknown, options));
        Assert.Equal($"{unknown}: tensor 'model.vision_tower.encoder.layer.0.attention.bogus.weight' is not part of the Hugging Face InternVL layout (no rule in HfLayout maps it)", e.Message);

        string lonely = CopyFolder(Out("hf"), "lonely");
        RewriteWeights(lonely, t => t.Where(kv => kv.Key != "model.vision_tower.encoder.layer.1.attention.v_proj.bias"));
        e = Assert.Throws<CheckpointException>(() => InternVLModelLoader.Load(lonely, options));
        Assert.DoesNotContain('\n', e.Message);
        Assert.Contains("'model.vision_tower.encoder.layer.1.attention.v_proj.bias' is missing beside 'model.vision_tower.encoder.layer.1.attention.q_proj.bias', 'model.vision_tower.encoder.layer.1.attention.k_proj.bias' (together they are 'vision_model.encoder.layers.1.attn.qkv.bias')", e.Message);

        // A name under the LLM prefix maps, but the model has no such parameter: the strict loader names it as stored.
        string extra = CopyFolder(Out("hf"), "extra");
        RewriteWeights(extra, t => t.Append(new("model.language_model.layers.0.self_attn.extra.weight", zeros(2))));
        e = Assert.Throws<CheckpointException>(() => InternVLModelLoader.Load(extra, options));
        Assert.Contains("unexpected tensor (not part of this model): 'model.language_model.layers.0.self_attn.extra.weight'", e.Message);

        string missing = CopyFolder(Out("hf"), "missing");
        RewriteWeights(missing, t => t.Where(kv => kv.Key != "lm_head.weight"));
        e = Assert.Throws<CheckpointException>(() => InternVLModelLoader.Load(missing, options));
        Assert.Contains("missing tensor: 'lm_head.weight'", e.Message);
    }

    [FixtureFact]
    public void BadHfConfigFieldsAreOneLineErrorsNamingTheField()
    {
        Merge(BaseOf("qwen2"), AdapterOf("qwen2"), Out("hf"), CheckpointLayout.Hf);
        var good = Json(Path.Combine(Out("hf"), "config.json"));

        string Error(Action<JsonObject> edit)
        {
            var config = (JsonObject)good.DeepClone();
            edit(config);
            using var doc = JsonDocument.Parse(config.ToJsonString());
            var e = Assert.Throws<VlmTuneException>(() => InternVLConfig.Parse(doc.RootElement, "config.json"));
            Assert.DoesNotContain('\n', e.Message);
            return e.Message;
        }

        Assert.Equal("config.json: text_config.model_type 'gemma' is not supported (supported: qwen2, qwen3, llama, phi3).",
            Error(c => c["text_config"]!["model_type"] = "gemma"));
        Assert.Equal("config.json: field 'text_config.hidden_size' must be an integer.",
            Error(c => c["text_config"]!["hidden_size"] = "wide"));
        Assert.Contains("vision_feature_select_strategy 'full' is not supported",
            Error(c => c["vision_feature_select_strategy"] = "full"));
        Assert.Contains("vision_config.use_mean_pooling is false",
            Error(c => c["vision_config"]!["use_mean_pooling"] = false));
        Assert.Contains("field 'vision_config.use_qk_norm' must be a boolean",
            Error(c => c["vision_config"]!["use_qk_norm"] = "yes"));
        Assert.Contains("vision_feature_layer must be one integer",
            Error(c => c["vision_feature_layer"] = new JsonArray(-1, -2)));
        Assert.Contains("image_seq_length is 64",
            Error(c => c["image_seq_length"] = 64));
        Assert.Contains("tie_word_embeddings is true but text_config.tie_word_embeddings is false",
            Error(c => c["tie_word_embeddings"] = true));
        Assert.Contains("vision_config.image_size [448, 224] is not square",
            Error(c => c["vision_config"]!["image_size"] = new JsonArray(448, 224)));
    }

    [FixtureFact]
    public void FieldsAnHfConfigLeavesOutTakeTransformersDefaults()
    {
        Merge(BaseOf("qwen2"), AdapterOf("qwen2"), Out("hf"), CheckpointLayout.Hf);
        var config = Json(Path.Combine(Out("hf"), "config.json"));
        // save_pretrained writes only what differs from the class defaults; transformers 5 writes rope_parameters.
        var vision = config["vision_config"]!.AsObject();
        vision["hidden_size"] = 1024;
        foreach (var field in new[] { "hidden_size", "norm_type", "attention_bias", "use_qk_norm" }) vision.Remove(field);
        config.Remove("downsample_ratio");
        config.Remove("image_seq_length");
        var text = config["text_config"]!.AsObject();
        text.Remove("rms_norm_eps");
        text.Remove("rope_theta");
        text.Remove("tie_word_embeddings");
        text.Remove("max_position_embeddings");
        text["rope_parameters"] = new JsonObject { ["rope_type"] = "default", ["rope_theta"] = 1e6 };
        using var doc = JsonDocument.Parse(config.ToJsonString());
        var parsed = InternVLConfig.Parse(doc.RootElement, "config.json");

        Assert.Equal(1024, parsed.Vision.HiddenSize);               // InternVLVisionConfig defaults, not InternViT's
        Assert.Equal("layer_norm", parsed.Vision.NormType);
        Assert.False(parsed.Vision.QkvBias);
        Assert.False(parsed.Vision.QkNormalization);
        Assert.Equal(0.5, parsed.DownsampleRatio);
        Assert.Equal(1e-6, parsed.Llm.RmsNormEps);                  // Qwen2Config defaults
        Assert.Equal(32768, parsed.Llm.MaxPositionEmbeddings);
        Assert.False(parsed.Llm.TieWordEmbeddings);
        Assert.Equal(1e6, parsed.Llm.RopeTheta);
        Assert.Null(parsed.Llm.RopeScaling);
        Assert.Equal(12, parsed.MaxDynamicPatch);

        // The folder's preprocessor_config.json gives the tiling limits.
        File.WriteAllText(Path.Combine(Out("hf"), "preprocessor_config.json"), """{"min_patches": 2, "max_patches": 6}""");
        var folder = InternVLConfig.Load(Out("hf"));
        Assert.Equal((2, 6), (folder.MinDynamicPatch, folder.MaxDynamicPatch));

        // image_token_id must be the tokenizer's <IMG_CONTEXT> (transformers' default 151667 is Qwen2.5's, not Qwen3's).
        var wrongToken = Json(Path.Combine(Out("hf"), "config.json"));
        wrongToken["image_token_id"] = 151671;
        File.WriteAllText(Path.Combine(Out("hf"), "config.json"), wrongToken.ToJsonString());
        var e = Assert.Throws<VlmTuneException>(() => InternVLConfig.Load(Out("hf")));
        Assert.EndsWith("config.json: image_token_id is 151671, but the tokenizer's <IMG_CONTEXT> is 151667; transformers would place the image features elsewhere than VlmTune.", e.Message);
    }

    [FixtureFact]
    public void QkNormRmsNormViTAndInternLM2BiasesSurviveTheRoundTrip()
    {
        // A random InternVL-6B-style ViT (RMSNorm, q/k normalisation, no qkv bias) and an InternLM2 with biases.
        using var scope = NewDisposeScope();
        string baseDir = Out("base");
        Directory.CreateDirectory(baseDir);
        foreach (var f in Directory.GetFiles(Fixtures.TinyModel).Where(f => !f.EndsWith(".safetensors") && !f.EndsWith("config.json")))
            File.Copy(f, Path.Combine(baseDir, Path.GetFileName(f)));
        var config = Json(Path.Combine(Fixtures.TinyModel, "config.json"));
        config["vision_config"]!["norm_type"] = "rms_norm";
        config["vision_config"]!["qk_normalization"] = true;
        config["vision_config"]!["qkv_bias"] = false;
        config["llm_config"]!["bias"] = true;
        File.WriteAllText(Path.Combine(baseDir, "config.json"), config.ToJsonString());
        using (var model = new InternVLChatModel(InternVLConfig.Load(baseDir), new ModelOptions()))
        {
            torch.random.manual_seed(3);
            using (no_grad())
                foreach (var (_, p) in model.named_parameters()) p.copy_(randn_like(p) * 0.05 + (p.dim() == 1 ? 1 : 0));
            SafetensorsWriter.Write(Path.Combine(baseDir, CheckpointFolder.SingleFile), model.named_parameters().Select(p => new KeyValuePair<string, Tensor>(p.name, p.parameter)));
        }
        string adapter = Out("trained");
        Directory.CreateDirectory(adapter);
        SafetensorsWriter.Write(Path.Combine(adapter, TrainedWeights.FileName), [new("mlp1.1.weight", randn(64, 256) * 0.05)]);

        Merge(baseDir, adapter, Out("official"), CheckpointLayout.Official);
        Merge(baseDir, adapter, Out("hf"), CheckpointLayout.Hf);
        var official = StoredShapes(Out("official"));
        var stored = StoredShapes(Out("hf"));
        Assert.Equal(Converter.Names(official.Keys, llamaText: true), stored.Keys.Order(StringComparer.Ordinal).ToList());
        Assert.Contains("model.vision_tower.encoder.layer.0.attention.q_norm.weight", stored.Keys);
        Assert.DoesNotContain("model.vision_tower.encoder.layer.0.attention.q_proj.bias", stored.Keys);
        Assert.Equal(new long[] { 32 }, stored["model.language_model.layers.1.self_attn.v_proj.bias"]);
        Assert.Equal(new long[] { 64 }, stored["model.language_model.layers.1.self_attn.o_proj.bias"]);
        var hfConfig = Json(Path.Combine(Out("hf"), "config.json"));
        Assert.True(hfConfig["vision_config"]!["use_qk_norm"]!.GetValue<bool>());
        Assert.Equal("rms_norm", hfConfig["vision_config"]!["norm_type"]!.GetValue<string>());
        Assert.True(hfConfig["text_config"]!["attention_bias"]!.GetValue<bool>());

        int imageContext = ImageContextId(baseDir);
        var expected = Logits(Out("official"), imageContext);
        var actual = Logits(Out("hf"), imageContext);
        Assert.True(MaxDiff(expected, actual) <= 1e-4, $"max |Δ| {MaxDiff(expected, actual)}");
    }

    [Fact]
    public void GroupedQkvSplitIsTheConvertersRearrangeAndJoinsBack()
    {
        using var scope = NewDisposeScope();
        // 2 KV heads, 3 query heads each, head_dim 4, input width 5: wqkv rows are (h gs d) with gs = 3 + 2.
        var config = new InternVLConfig
        {
            Vision = new VisionConfig { HiddenSize = 8, NumHiddenLayers = 1, NumAttentionHeads = 2, IntermediateSize = 8 },
            Llm = new LlmConfig { Architecture = LlmArchitectures.InternLM2, HiddenSize = 24, NumHiddenLayers = 1, NumAttentionHeads = 6, NumKeyValueHeads = 2, IntermediateSize = 8, VocabSize = 8, HeadDim = 4 },
        };
        const int kvh = 2, groups = 3, d = 4, z = 5;
        var fused = arange(kvh * (groups + 2) * d * z, dtype: ScalarType.Float32).reshape(kvh * (groups + 2) * d, z);
        var parts = FusedQkv.Grouped.Split(fused, config);
        Assert.Equal([kvh * groups * d, z], parts[0].shape);
        Assert.Equal([kvh * d, z], parts[1].shape);
        for (int row = 0; row < kvh * (groups + 2) * d; row++)
        {
            int h = row / ((groups + 2) * d), gs = row / d % (groups + 2), dd = row % d;
            // q_proj = qkv_vecs[:, :groups].reshape(-1, z); k_proj = qkv_vecs[:, -2]; v_proj = qkv_vecs[:, -1]
            var (part, at) = gs < groups ? (parts[0], (h * groups + gs) * d + dd) : (parts[gs - groups + 1], h * d + dd);
            Assert.True(Same(part[at], fused[row]), $"row {row}");
        }
        Assert.True(Same(FusedQkv.Grouped.Join(parts, config), fused));

        var bias = arange(kvh * (groups + 2) * d, dtype: ScalarType.Float32);
        Assert.True(Same(FusedQkv.Grouped.Join(FusedQkv.Grouped.Split(bias, config), config), bias));
        var vit = arange(3 * 8 * 8, dtype: ScalarType.Float32).reshape(24, 8);
        var thirds = FusedQkv.Thirds.Split(vit, config);
        Assert.True(Same(thirds[2], vit[16..]));
        Assert.True(Same(FusedQkv.Thirds.Join(thirds, config), vit));
    }

    private static bool Same(Tensor a, Tensor b) => a.dtype == b.dtype && a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();

    private string CopyFolder(string from, string name)
    {
        string to = Out(name);
        Directory.CreateDirectory(to);
        foreach (var f in Directory.GetFiles(from)) File.Copy(f, Path.Combine(to, Path.GetFileName(f)));
        return to;
    }

    /// <summary>Rewrites a single-file folder's weights through <paramref name="edit"/>.</summary>
    private static void RewriteWeights(string dir, Func<IEnumerable<KeyValuePair<string, Tensor>>, IEnumerable<KeyValuePair<string, Tensor>>> edit)
    {
        string path = Path.Combine(dir, CheckpointFolder.SingleFile);
        List<KeyValuePair<string, Tensor>> tensors;
        using (var file = SafetensorsFile.Open(path))
            tensors = file.Entries.Keys.Select(n => new KeyValuePair<string, Tensor>(n, file.Read(n))).ToList();
        var edited = edit(tensors).ToList();
        File.Delete(path);
        SafetensorsWriter.Write(path, edited);
        foreach (var t in tensors) t.Value.Dispose();
    }
}
