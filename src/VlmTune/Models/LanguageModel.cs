using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace VlmTune.Models;

/// <summary>
/// The LLM half of an InternVL model, whatever its family (<c>llm_config.architectures</c>): what the vision splice,
/// training, merging and decoding need from it. Each family is its own module tree whose field names equal its checkpoint
/// keys (InternLM2's <c>model.tok_embeddings</c> / <c>output</c>, the Llama layout's <c>model.embed_tokens</c> /
/// <c>lm_head</c>), so loading stays strict with no name map.
/// </summary>
public abstract class CausalLanguageModel : nn.Module
{
    protected CausalLanguageModel(string name, LlmConfig config) : base(name) => Config = config;

    public LlmConfig Config { get; }

    /// <summary>Token embeddings (B, T) → (B, T, D).</summary>
    public Tensor Embed(Tensor ids) => TokenEmbedding.forward(ids);

    /// <summary>Final hidden states (B, T, D) for input embeddings (B, T, D): every layer, then the final RMSNorm.</summary>
    public Tensor Forward(Tensor inputsEmbeds, DecoderInputs inputs)
    {
        using var scope = NewDisposeScope();
        return FinalNorm.forward(RunLayers(inputsEmbeds, inputs)).MoveToOuterDisposeScope();
    }

    /// <summary>The RMSNorm after the last decoder layer (<c>model.norm</c>).</summary>
    public abstract RmsNorm FinalNorm { get; }

    /// <summary>Logits (…, V) of hidden states; the caller picks which positions need them.</summary>
    public Tensor Logits(Tensor hidden) => OutputHead.forward(hidden);

    public abstract Embedding TokenEmbedding { get; }

    /// <summary>
    /// The output projection. With <c>tie_word_embeddings</c> it is a view of <see cref="TokenEmbedding"/>'s weight
    /// that is not a registered module: the checkpoint holds one tensor (HF's <c>save_pretrained</c> drops the head).
    /// </summary>
    public abstract Linear OutputHead { get; }

    /// <summary>The head's module name inside this model (<c>output</c>, <c>lm_head</c>); null when tied (not a module of its own).</summary>
    public abstract string? OutputHeadName { get; }

    /// <summary>
    /// Whether <paramref name="fullName"/> is an LLM output head (<c>output</c>, <c>lm_head</c>) under the model part
    /// <paramref name="root"/> (<c>language_model.</c>): PEFT's "all-linear" leaves heads out.
    /// </summary>
    public static bool IsOutputHeadName(string fullName, string root) =>
        root == "language_model." && fullName is "language_model.output" or "language_model.lm_head";

    /// <summary>The decoder layers, in order; their container is <see cref="LayerStack"/>.</summary>
    public abstract IReadOnlyList<DecoderLayer> Layers { get; }

    /// <summary>The module holding the decoder layers (<c>model.layers</c>): the scope of QLoRA's quantisation.</summary>
    public abstract nn.Module LayerStack { get; }

    public abstract RotaryEmbedding Rotary { get; }

    /// <summary>
    /// The linear layers the official <c>wrap_llm_lora</c> adapts for this family (PEFT names, matched as suffixes), so
    /// adapters interchange with InternVL's Python training.
    /// </summary>
    public abstract IReadOnlyList<string> OfficialLoraTargets { get; }

    /// <summary>What LoRA adapts when the recipe names nothing: the official targets and the output head unless it is tied.</summary>
    public IReadOnlyList<string> DefaultLoraTargets => [.. OfficialLoraTargets, .. OutputHeadName is { } head ? [head] : Array.Empty<string>()];

    /// <summary>Runs each decoder layer; set by training to checkpoint layers (recompute activations in backward).</summary>
    public Func<DecoderLayer, Tensor, RotaryTables, DecoderInputs, Tensor>? LayerRunner { get; set; }

    /// <summary>
    /// The pass every family shares: positions (given, per packed sample, or past + 0..T-1), one rotary table for all
    /// layers, the cache re-rotated when dynamic NTK changes the base, each layer's input released once consumed.
    /// </summary>
    private Tensor RunLayers(Tensor x, DecoderInputs inputs)
    {
        long b = x.shape[0], t = x.shape[1];
        long past = inputs.Cache?.Length ?? 0;
        if (inputs.Packing is { } packing && (inputs.Cache is not null || inputs.KeyMask is not null || packing.Rows != b || packing.RowLength != t))
            throw new ArgumentException($"packed rows ({packing.Rows} × {packing.RowLength}) need a full pass over (B, T) = ({b}, {t}) embeddings without cache or key mask.");
        var positions = inputs.PositionIds ?? inputs.Packing?.PositionIds(x.device) ?? arange(past, past + t, device: x.device).unsqueeze(0).expand(b, t);
        var rope = Rotary.Tables(positions, inputs.Packing?.LongestSample ?? inputs.RopeLength ?? past + t, x.dtype);
        inputs.Cache?.Rerotate(Rotary, rope.Theta);
        var layers = Layers;
        for (int i = 0; i < layers.Count; i++)
        {
            var next = LayerRunner is null ? layers[i].Forward(x, rope, inputs) : LayerRunner(layers[i], x, rope, inputs);
            // Release our handle on the previous layer's output now (autograd keeps what it saved): with activation
            // offloading nothing else holds it, and the GPU need not keep every layer's output until the last layer.
            if (i > 0) x.Dispose();
            x = next;
        }
        inputs.Cache?.Advance(positions, rope.Theta);
        return x;
    }

    /// <summary>Builds the LLM that <paramref name="c"/>'s architecture names.</summary>
    public static CausalLanguageModel Create(LlmConfig c, ModelOptions o) => c.Architecture switch
    {
        LlmArchitectures.InternLM2 => new InternLM2ForCausalLM(c, o),
        LlmArchitectures.Llama or LlmArchitectures.Qwen2 or LlmArchitectures.Qwen3 => new LlamaForCausalLM(c, o),
        LlmArchitectures.Phi3 => new Phi3ForCausalLM(c, o),
        _ => throw new VlmTuneException($"llm_config.architectures '{c.Architecture}' has no VlmTune backend."),
    };
}

/// <summary>One decoder layer of any family: pre-norm attention and MLP with residuals.</summary>
public abstract class DecoderLayer(string name, int index) : nn.Module(name)
{
    public int Index { get; } = index;

    public abstract Tensor Forward(Tensor x, RotaryTables rope, DecoderInputs inputs);
}

/// <summary>The attention block of a family: its own projections (and norms) around <see cref="GroupedAttention"/>.</summary>
public interface IAttention
{
    /// <summary>(B, T, D) normalised hidden states → (B, T, D) attention output.</summary>
    Tensor Forward(Tensor x, RotaryTables rope, DecoderInputs inputs);
}

/// <summary>
/// The Hugging Face decoder stack the Llama layout and Phi-3 share (<c>model.embed_tokens</c>, <c>model.layers</c>,
/// <c>model.norm</c>); the families differ only in their attention and MLP modules.
/// </summary>
public sealed class HfModel<TAttention, TMlp> : nn.Module
    where TAttention : nn.Module, IAttention where TMlp : nn.Module<Tensor, Tensor>
{
    public Embedding embed_tokens;
    public ModuleList<HfDecoderLayer<TAttention, TMlp>> layers;
    public RmsNorm norm;

    public RotaryEmbedding Rotary { get; }

    public HfModel(LlmConfig c, ModelOptions o, Func<int, TAttention> attention, Func<TMlp> mlp) : base("HfModel")
    {
        embed_tokens = new Embedding(c.VocabSize, c.HiddenSize, o);
        layers = new ModuleList<HfDecoderLayer<TAttention, TMlp>>(Enumerable.Range(0, c.NumHiddenLayers)
            .Select(i => new HfDecoderLayer<TAttention, TMlp>(c, o, i, attention(i), mlp())).ToArray());
        norm = new RmsNorm(c.HiddenSize, c.RmsNormEps, o);
        Rotary = new RotaryEmbedding(c);
        RegisterComponents();
    }
}

/// <summary>A Hugging Face pre-norm decoder layer: <c>self_attn</c> and <c>mlp</c>, each after its RMSNorm, with residuals.</summary>
public sealed class HfDecoderLayer<TAttention, TMlp> : DecoderLayer
    where TAttention : nn.Module, IAttention where TMlp : nn.Module<Tensor, Tensor>
{
    public TAttention self_attn;
    public TMlp mlp;
    public RmsNorm input_layernorm;
    public RmsNorm post_attention_layernorm;

    public HfDecoderLayer(LlmConfig c, ModelOptions o, int index, TAttention attention, TMlp feedForward) : base("HfDecoderLayer", index)
    {
        self_attn = attention;
        mlp = feedForward;
        input_layernorm = new RmsNorm(c.HiddenSize, c.RmsNormEps, o);
        post_attention_layernorm = new RmsNorm(c.HiddenSize, c.RmsNormEps, o);
        RegisterComponents();
    }

    public override Tensor Forward(Tensor x, RotaryTables rope, DecoderInputs inputs)
    {
        using var scope = NewDisposeScope();
        var h = x + self_attn.Forward(input_layernorm.forward(x), rope, inputs);
        return (h + mlp.forward(post_attention_layernorm.forward(h))).MoveToOuterDisposeScope();
    }
}

/// <summary>What a decoder pass needs besides the embeddings.</summary>
public sealed record DecoderInputs
{
    /// <summary>(B, T) positions; null: past length + 0..T-1 for every row.</summary>
    public Tensor? PositionIds { get; init; }
    /// <summary>Key/value cache to read and extend; null for a full pass.</summary>
    public KvCache? Cache { get; init; }
    /// <summary>(B, S) bool, true where a key (past + current) may be attended to (left padding in batches).</summary>
    public Tensor? KeyMask { get; init; }
    /// <summary>
    /// Training on packed rows: the samples each row holds. Positions restart per sample (unless
    /// <see cref="PositionIds"/> is given) and attention never crosses samples. Not combinable with a cache or key mask.
    /// </summary>
    public PackedRows? Packing { get; init; }
    /// <summary>
    /// The sequence length that decides a dynamic-NTK RoPE base when it is not T: the longest sample of a training
    /// batch whose rows are padded past it (TrainConfig.pad_to_multiple_of), so rounding never changes the base the
    /// official code derives from the padded-to-the-longest batch. Null: past + T (packed rows: their longest sample).
    /// </summary>
    public long? RopeLength { get; init; }
}

/// <summary>
/// Grouped-query attention over rotated q (B, H, T, d) and k/v (B, kvh, T, d), shared by every family once its own
/// projections have produced them: the cache is extended, and the path chosen for packed rows, one-token decoding
/// (each KV head's query group folded into the query axis, so K/V are read once and never repeated) or a full pass.
/// Returns (B, H, T, d).
/// </summary>
internal static class GroupedAttention
{
    public static Tensor Compute(Tensor q, Tensor k, Tensor v, int layer, AttentionKind kind, DecoderInputs inputs)
    {
        long b = q.shape[0], heads = q.shape[1], t = q.shape[2], d = q.shape[3], kvh = k.shape[1], groups = heads / kvh;
        if (inputs.Cache is { } cache) (k, v) = cache.Append(layer, k, v);                      // (B, kvh, S, d)
        long s = k.shape[2];
        if (inputs.Packing is { } packing)
            return Attention.ComputePacked(q, RepeatKv(k, groups), RepeatKv(v, groups), kind, packing);
        if (t == 1)
        {
            var qg = q.view(b, kvh, groups, d);                                                  // (B, kvh, groups, d)
            return Attention.Compute(qg, k, v, kind, causalOffset: null, keyMask: inputs.KeyMask).reshape(b, heads, 1, d);
        }
        return Attention.Compute(q, RepeatKv(k, groups), RepeatKv(v, groups), kind, causalOffset: s - t, keyMask: inputs.KeyMask);
    }

    private static Tensor RepeatKv(Tensor x, long groups)
    {
        if (groups == 1) return x;
        long b = x.shape[0], h = x.shape[1], s = x.shape[2], d = x.shape[3];
        return x.unsqueeze(2).expand(b, h, groups, s, d).reshape(b, h * groups, s, d);           // (B, H, S, d)
    }
}

/// <summary>The SwiGLU product silu(gate) · up, releasing each (tokens × intermediate) input as soon as it is consumed.</summary>
internal static class SwiGlu
{
    /// <summary>
    /// Without autograd the released tensors are freed at once, so an MLP peaks at three (tokens × intermediate) tensors
    /// rather than holding every one until it returns. Takes ownership of <paramref name="gate"/> and <paramref name="up"/>.
    /// </summary>
    public static Tensor Apply(Tensor gate, Tensor up)
    {
        var act = nn.functional.silu(gate);
        gate.Dispose();
        var product = act * up;
        act.Dispose(); up.Dispose();
        return product;
    }
}
