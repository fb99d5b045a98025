using System.Text.RegularExpressions;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Checkpoints;

/// <summary>
/// The weight names of the Hugging Face-native InternVL layout, as transformers' <c>models/internvl/convert_internvl_weights_to_hf.py</c>
/// writes it: the key map (official name ↔ hf name, with the fused q/k/v projections cut into three); its config.json is
/// <see cref="HfConfig"/>'s. VlmTune's modules keep the official names; a folder in this layout is read through
/// <see cref="ModelWeights"/> and written by <c>vlmtune merge --layout hf</c>. See docs/merge.md.
/// </summary>
public static class HfLayout
{
    // ── Weights ──────────────────────────────────────────────────────────────────────────────────────────────────
    // Official name → hf name. {n} is a layer index, {p} weight or bias, {rest} the remainder of the name. Names are
    // those of the converter's ORIGINAL_TO_CONVERTED_KEY_MAPPING_* tables after InternVLForConditionalGeneration's
    // _checkpoint_conversion_mapping (vision_tower → model.vision_tower, language_model.model → model.language_model,
    // language_model.lm_head → lm_head), which is how transformers ≥ 4.52 names the parameters and v5 saves them.

    /// <summary>InternViT (→ InternVLVisionModel) and the mlp1 projector (→ InternVLMultiModalProjector): every family.</summary>
    private static readonly KeyRule[] VisionAndProjector =
    [
        Rename("vision_model.embeddings.class_embedding",              "model.vision_tower.embeddings.cls_token"),
        Rename("vision_model.embeddings.position_embedding",           "model.vision_tower.embeddings.position_embeddings"),
        Rename("vision_model.embeddings.patch_embedding.{p}",          "model.vision_tower.embeddings.patch_embeddings.projection.{p}"),
        Rename("vision_model.encoder.layers.{n}.norm1.{p}",            "model.vision_tower.encoder.layer.{n}.layernorm_before.{p}"),
        Split ("vision_model.encoder.layers.{n}.attn.qkv.{p}",         FusedQkv.Thirds,
               "model.vision_tower.encoder.layer.{n}.attention.q_proj.{p}",
               "model.vision_tower.encoder.layer.{n}.attention.k_proj.{p}",
               "model.vision_tower.encoder.layer.{n}.attention.v_proj.{p}"),
        Rename("vision_model.encoder.layers.{n}.attn.q_norm.weight",   "model.vision_tower.encoder.layer.{n}.attention.q_norm.weight"),
        Rename("vision_model.encoder.layers.{n}.attn.k_norm.weight",   "model.vision_tower.encoder.layer.{n}.attention.k_norm.weight"),
        Rename("vision_model.encoder.layers.{n}.attn.proj.{p}",        "model.vision_tower.encoder.layer.{n}.attention.projection_layer.{p}"),
        Rename("vision_model.encoder.layers.{n}.ls1",                  "model.vision_tower.encoder.layer.{n}.lambda_1"),
        Rename("vision_model.encoder.layers.{n}.norm2.{p}",            "model.vision_tower.encoder.layer.{n}.layernorm_after.{p}"),
        Rename("vision_model.encoder.layers.{n}.mlp.fc1.{p}",          "model.vision_tower.encoder.layer.{n}.mlp.fc1.{p}"),
        Rename("vision_model.encoder.layers.{n}.mlp.fc2.{p}",          "model.vision_tower.encoder.layer.{n}.mlp.fc2.{p}"),
        Rename("vision_model.encoder.layers.{n}.ls2",                  "model.vision_tower.encoder.layer.{n}.lambda_2"),
        Rename("mlp1.0.{p}",                                           "model.multi_modal_projector.layer_norm.{p}"),
        Rename("mlp1.1.{p}",                                           "model.multi_modal_projector.linear_1.{p}"),
        Rename("mlp1.3.{p}",                                           "model.multi_modal_projector.linear_2.{p}"),
    ];

    /// <summary>LLMs whose official checkpoints already use transformers' names (Qwen2, Qwen3, Llama, Phi-3): the prefix moves.</summary>
    private static readonly KeyRule[] TransformersNamedLlm =
    [
        Rename("language_model.model.{rest}",                          "model.language_model.{rest}"),
        Rename("language_model.lm_head.weight",                        "lm_head.weight"),
    ];

    /// <summary>InternLM2 becomes a Llama text model (the converter's TEXT_LLAMA table and its wqkv rearrange); export only.</summary>
    private static readonly KeyRule[] InternLM2AsLlama =
    [
        Rename("language_model.model.tok_embeddings.weight",           "model.language_model.embed_tokens.weight"),
        Rename("language_model.model.layers.{n}.attention_norm.weight", "model.language_model.layers.{n}.input_layernorm.weight"),
        Split ("language_model.model.layers.{n}.attention.wqkv.{p}",   FusedQkv.Grouped,
               "model.language_model.layers.{n}.self_attn.q_proj.{p}",
               "model.language_model.layers.{n}.self_attn.k_proj.{p}",
               "model.language_model.layers.{n}.self_attn.v_proj.{p}"),
        Rename("language_model.model.layers.{n}.attention.wo.{p}",     "model.language_model.layers.{n}.self_attn.o_proj.{p}"),
        Rename("language_model.model.layers.{n}.ffn_norm.weight",      "model.language_model.layers.{n}.post_attention_layernorm.weight"),
        Rename("language_model.model.layers.{n}.feed_forward.w1.weight", "model.language_model.layers.{n}.mlp.gate_proj.weight"),
        Rename("language_model.model.layers.{n}.feed_forward.w3.weight", "model.language_model.layers.{n}.mlp.up_proj.weight"),
        Rename("language_model.model.layers.{n}.feed_forward.w2.weight", "model.language_model.layers.{n}.mlp.down_proj.weight"),
        Rename("language_model.model.norm.weight",                     "model.language_model.norm.weight"),
        Rename("language_model.output.weight",                         "lm_head.weight"),
    ];

    /// <summary>
    /// Folders saved by transformers 4.52–4.57 keep the converter's own prefixes (save_pretrained reversed the
    /// conversion mapping); transformers still loads them through _checkpoint_conversion_mapping, and so does VlmTune.
    /// </summary>
    private static readonly (string Saved, string Current)[] LegacyPrefixes =
    [
        ("vision_tower.",           "model.vision_tower."),
        ("multi_modal_projector.",  "model.multi_modal_projector."),
        ("language_model.model.",   "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
    ];

    /// <summary>The rules that write an official model: its vision side, then its LLM family's.</summary>
    private static KeyRule[] ExportRules(LlmConfig llm) =>
        [.. VisionAndProjector, .. llm.Architecture == LlmArchitectures.InternLM2 ? InternLM2AsLlama : TransformersNamedLlm];

    /// <summary>The rules that read an hf folder: its text model is always a transformers one, named as in transformers.</summary>
    private static readonly KeyRule[] ReadRules = [.. VisionAndProjector, .. TransformersNamedLlm];

    /// <summary>The hf tensors one official tensor becomes: one renamed, or a fused q/k/v cut into three.</summary>
    public sealed record HfTensors(string Official, IReadOnlyList<string> Names, IReadOnlyList<long[]> Shapes, FusedQkv? Fused);

    /// <summary>How a stored hf tensor set becomes one official tensor: the names, and the join for a fused q/k/v.</summary>
    public sealed record StoredTensors(IReadOnlyList<string> Names, FusedQkv? Fused);

    /// <summary>The hf name(s) and shapes of one official tensor; throws for a name no rule covers.</summary>
    public static HfTensors ToHf(string official, long[] shape, InternVLConfig config)
    {
        foreach (var rule in ExportRules(config.Llm))
        {
            if (rule.MatchOfficial(official) is not { } values) continue;
            var names = rule.Hf.Select(p => KeyRule.Fill(p, values)).ToList();
            return rule.Fused is { } fused
                ? new HfTensors(official, names, fused.PartShapes(shape, config), fused)
                : new HfTensors(official, names, [shape], null);
        }
        throw new CheckpointException($"tensor '{official}' has no name in the Hugging Face InternVL layout (no rule in HfLayout maps it).");
    }

    /// <summary>
    /// Official name → the stored hf tensors it is read from, for every tensor of an hf folder. Unknown names, a q/k/v
    /// projection without its two siblings, or a name stored twice (current and legacy prefix) are all reported at once.
    /// </summary>
    public static Dictionary<string, StoredTensors> ReadPlan(IEnumerable<string> storedNames, string location)
    {
        var problems = new List<string>();
        var parts = new Dictionary<string, (KeyRule Rule, string?[] Names, string[] Expected)>(StringComparer.Ordinal);
        foreach (var stored in storedNames.Order(StringComparer.Ordinal))
        {
            string name = WithCurrentPrefix(stored);
            bool matched = false;
            foreach (var rule in ReadRules)
            {
                for (int i = 0; i < rule.Hf.Length && !matched; i++)
                {
                    if (KeyRule.Match(rule.HfPatterns[i], name) is not { } values) continue;
                    matched = true;
                    string official = KeyRule.Fill(rule.Official, values);
                    if (!parts.TryGetValue(official, out var entry))
                        parts[official] = entry = (rule, new string?[rule.Hf.Length], rule.Hf.Select(p => KeyRule.Fill(p, values)).ToArray());
                    if (entry.Names[i] is { } first) problems.Add($"tensor '{stored}' is stored twice (also as '{first}')");
                    else entry.Names[i] = stored;
                }
                if (matched) break;
            }
            if (!matched) problems.Add($"tensor '{stored}' is not part of the Hugging Face InternVL layout (no rule in HfLayout maps it)");
        }
        var plan = new Dictionary<string, StoredTensors>(StringComparer.Ordinal);
        foreach (var (official, (rule, names, expected)) in parts)
        {
            var absent = expected.Where((_, i) => names[i] is null).ToList();
            if (absent.Count > 0)
                problems.Add($"'{string.Join("', '", absent)}' {(absent.Count == 1 ? "is" : "are")} missing beside '{string.Join("', '", names.Where(n => n is not null))}' (together they are '{official}')");
            else plan[official] = new StoredTensors(names!, rule.Fused);
        }
        if (problems.Count > 0)
            throw new CheckpointException($"{location}: {(problems.Count == 1 ? problems[0] : "\n  " + string.Join("\n  ", problems))}");
        return plan;
    }

    /// <summary>The hf name(s) an official tensor would be stored under, for messages about a tensor the folder lacks.</summary>
    public static string DescribeHfName(string official)
    {
        foreach (var rule in ReadRules)
            if (rule.MatchOfficial(official) is { } values) return string.Join("', '", rule.Hf.Select(p => KeyRule.Fill(p, values)));
        return official;
    }

    private static string WithCurrentPrefix(string name)
    {
        foreach (var (saved, current) in LegacyPrefixes)
            if (name.StartsWith(saved, StringComparison.Ordinal)) return current + name[saved.Length..];
        return name;
    }

    private static KeyRule Rename(string official, string hf) => new(official, [hf], null);

    private static KeyRule Split(string official, FusedQkv fused, string q, string k, string v) => new(official, [q, k, v], fused);

    /// <summary>One line of the key map. Patterns are matched whole; {n}, {p} and {rest} carry over to the other side.</summary>
    private sealed class KeyRule
    {
        public string Official { get; }
        public string[] Hf { get; }
        public FusedQkv? Fused { get; }
        public Regex[] HfPatterns { get; }
        private readonly Regex _official;

        public KeyRule(string official, string[] hf, FusedQkv? fused)
        {
            Official = official; Hf = hf; Fused = fused;
            _official = Compile(official);
            HfPatterns = hf.Select(Compile).ToArray();
        }

        public Dictionary<string, string>? MatchOfficial(string name) => Match(_official, name);

        public static Dictionary<string, string>? Match(Regex pattern, string name)
        {
            var m = pattern.Match(name);
            if (!m.Success) return null;
            return pattern.GetGroupNames().Where(g => g != "0").ToDictionary(g => g, g => m.Groups[g].Value);
        }

        public static string Fill(string pattern, IReadOnlyDictionary<string, string> values) =>
            values.Aggregate(pattern, (p, kv) => p.Replace("{" + kv.Key + "}", kv.Value, StringComparison.Ordinal));

        private static Regex Compile(string pattern) => new("^" + Regex.Escape(pattern)
            .Replace(@"\{n}", @"(?<n>\d+)", StringComparison.Ordinal)
            .Replace(@"\{p}", "(?<p>weight|bias)", StringComparison.Ordinal)
            .Replace(@"\{rest}", "(?<rest>.+)", StringComparison.Ordinal) + "$", RegexOptions.CultureInvariant);
    }
}

/// <summary>
/// A fused q/k/v projection (weight (out, in) or bias (out)) and transformers' three separate ones: how one is cut into
/// the other and joined back, along the output dimension.
/// </summary>
public abstract class FusedQkv
{
    /// <summary>InternViT's attn.qkv: q, k and v one after another, each of the hidden size (the converter's [:dim], [dim:2dim], [-dim:]).</summary>
    public static readonly FusedQkv Thirds = new ThirdsQkv();

    /// <summary>InternLM2's wqkv: per KV head its query heads, then its key and its value (the converter's "(h gs d) z", gs = groups + 2).</summary>
    public static readonly FusedQkv Grouped = new GroupedQkv();

    public abstract long[][] PartShapes(long[] fused, InternVLConfig config);

    /// <summary>Cuts <paramref name="fused"/> into contiguous q, k, v tensors of its dtype.</summary>
    public abstract Tensor[] Split(Tensor fused, InternVLConfig config);

    /// <summary>Joins q, k, v into the fused tensor.</summary>
    public abstract Tensor Join(IReadOnlyList<Tensor> parts, InternVLConfig config);

    private sealed class ThirdsQkv : FusedQkv
    {
        public override long[][] PartShapes(long[] fused, InternVLConfig config)
        {
            var part = (long[])fused.Clone();
            part[0] = fused[0] / 3;
            return [part, (long[])part.Clone(), (long[])part.Clone()];
        }

        public override Tensor[] Split(Tensor fused, InternVLConfig config) =>
            fused.chunk(3, 0).Select(t => t.contiguous()).ToArray();

        public override Tensor Join(IReadOnlyList<Tensor> parts, InternVLConfig config) => cat([.. parts], 0);
    }

    private sealed class GroupedQkv : FusedQkv
    {
        public override long[][] PartShapes(long[] fused, InternVLConfig config)
        {
            var (kvh, groups, d) = Dims(config);
            long[] rest = fused[1..];
            return [[kvh * groups * d, .. rest], [kvh * d, .. rest], [kvh * d, .. rest]];
        }

        public override Tensor[] Split(Tensor fused, InternVLConfig config)
        {
            using var scope = NewDisposeScope();
            var (kvh, groups, d) = Dims(config);
            long[] rest = fused.shape[1..];
            var heads = fused.view([kvh, groups + 2, d, .. rest]);                        // (kvh, groups + 2, d, …)
            var q = heads[.., ..(int)groups].reshape([kvh * groups * d, .. rest]);        // (kvh·groups·d, …)
            var k = heads[.., (int)groups].reshape([kvh * d, .. rest]);                  // (kvh·d, …)
            var v = heads[.., (int)groups + 1].reshape([kvh * d, .. rest]);
            return [q.contiguous().MoveToOuterDisposeScope(), k.contiguous().MoveToOuterDisposeScope(), v.contiguous().MoveToOuterDisposeScope()];
        }

        public override Tensor Join(IReadOnlyList<Tensor> parts, InternVLConfig config)
        {
            using var scope = NewDisposeScope();
            var (kvh, groups, d) = Dims(config);
            long[] rest = parts[0].shape[1..];
            var q = parts[0].view([kvh, groups, d, .. rest]);
            var k = parts[1].view([kvh, 1, d, .. rest]);
            var v = parts[2].view([kvh, 1, d, .. rest]);
            return cat([q, k, v], 1).reshape([kvh * (groups + 2) * d, .. rest]).MoveToOuterDisposeScope();
        }

        private static (long KvHeads, long Groups, long HeadDim) Dims(InternVLConfig c) =>
            (c.Llm.NumKeyValueHeads, c.Llm.KeyValueGroups, c.Llm.HeadDim);
    }
}
