using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace VlmTune.Models;

/// <summary>
/// The Hugging Face Llama layout, which three InternVL LLM families share: <c>LlamaForCausalLM</c> (InternVL2-40B's Yi,
/// InternVL2-76B's Llama 3), <c>Qwen2ForCausalLM</c> (InternVL2-1B, InternVL2.5 and InternVL3: q/k/v biases) and
/// <c>Qwen3ForCausalLM</c> (InternVL3.5: per-head q/k RMSNorm, a head_dim of its own, often tied embeddings). They differ
/// only in the switches of <see cref="LlmConfig"/> (<c>QkvBias</c>, <c>OutputProjBias</c>, <c>MlpBias</c>, <c>QkNorm</c>,
/// <c>TieWordEmbeddings</c>), so one module tree, named like their checkpoints, serves all three.
/// </summary>
public sealed class LlamaForCausalLM : CausalLanguageModel
{
    public HfModel<LlamaAttention, LlamaMlp> model;
    public Linear? lm_head;

    private readonly Linear _head;
    private readonly IReadOnlyList<DecoderLayer> _layers;

    public LlamaForCausalLM(LlmConfig c, ModelOptions o) : base(c.Architecture, c)
    {
        model = new HfModel<LlamaAttention, LlamaMlp>(c, o, i => new LlamaAttention(c, o, i), () => new LlamaMlp(c, o));
        // Tied: no lm_head module (its checkpoint has no lm_head key); the head reads the embedding's weight.
        lm_head = c.TieWordEmbeddings ? null : new Linear(c.HiddenSize, c.VocabSize, false, o);
        RegisterComponents();
        _head = lm_head ?? Linear.Tied(() => model.embed_tokens.weight, c.HiddenSize, c.VocabSize, o);
        _layers = [.. model.layers];
    }

    public override Embedding TokenEmbedding => model.embed_tokens;
    public override Linear OutputHead => _head;
    public override string? OutputHeadName => lm_head is null ? null : nameof(lm_head);
    public override IReadOnlyList<DecoderLayer> Layers => _layers;
    public override nn.Module LayerStack => model.layers;
    public override RotaryEmbedding Rotary => model.Rotary;
    public override RmsNorm FinalNorm => model.norm;
    public override IReadOnlyList<string> OfficialLoraTargets { get; } =
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"];
}

public sealed class LlamaAttention : nn.Module, IAttention
{
    public Linear q_proj;
    public Linear k_proj;
    public Linear v_proj;
    public Linear o_proj;
    public RmsNorm? q_norm;   // Qwen3
    public RmsNorm? k_norm;   // Qwen3
    private readonly LlmConfig _c;
    private readonly AttentionKind _kind;
    private readonly int _layer;

    public LlamaAttention(LlmConfig c, ModelOptions o, int layer) : base(nameof(LlamaAttention))
    {
        _c = c; _kind = o.Attention; _layer = layer;
        long d = c.HeadDim;
        q_proj = new Linear(c.HiddenSize, c.NumAttentionHeads * d, c.QkvBias, o);
        k_proj = new Linear(c.HiddenSize, c.NumKeyValueHeads * d, c.QkvBias, o);
        v_proj = new Linear(c.HiddenSize, c.NumKeyValueHeads * d, c.QkvBias, o);
        o_proj = new Linear(c.NumAttentionHeads * d, c.HiddenSize, c.OutputProjBias, o);
        if (c.QkNorm) { q_norm = new RmsNorm(d, c.RmsNormEps, o); k_norm = new RmsNorm(d, c.RmsNormEps, o); }
        RegisterComponents();
    }

    public Tensor Forward(Tensor x, RotaryTables rope, DecoderInputs inputs)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1], d = _c.HeadDim, heads = _c.NumAttentionHeads, kvh = _c.NumKeyValueHeads;
        var q = q_proj.forward(x).view(b, t, heads, d);                                          // (B, T, H, d)
        var k = k_proj.forward(x).view(b, t, kvh, d);                                            // (B, T, kvh, d)
        if (q_norm is not null) { q = q_norm.forward(q); k = k_norm!.forward(k); }               // per head, over d
        q = rope.Apply(q.transpose(1, 2));                                                       // (B, H, T, d)
        k = rope.Apply(k.transpose(1, 2));                                                       // (B, kvh, T, d)
        var v = v_proj.forward(x).view(b, t, kvh, d).transpose(1, 2);                            // (B, kvh, T, d)
        var o = GroupedAttention.Compute(q, k, v, _layer, _kind, inputs);                       // (B, H, T, d)
        return o_proj.forward(o.transpose(1, 2).reshape(b, t, heads * d)).MoveToOuterDisposeScope();
    }
}

public sealed class LlamaMlp : nn.Module<Tensor, Tensor>
{
    public Linear gate_proj;
    public Linear up_proj;
    public Linear down_proj;

    public LlamaMlp(LlmConfig c, ModelOptions o) : base(nameof(LlamaMlp))
    {
        if (c.HiddenAct != "silu") throw new VlmTuneException($"llm_config.hidden_act '{c.HiddenAct}' is not supported (silu).");
        gate_proj = new Linear(c.HiddenSize, c.IntermediateSize, c.MlpBias, o);
        up_proj = new Linear(c.HiddenSize, c.IntermediateSize, c.MlpBias, o);
        down_proj = new Linear(c.IntermediateSize, c.HiddenSize, c.MlpBias, o);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var product = SwiGlu.Apply(gate_proj.forward(x), up_proj.forward(x));
        var y = down_proj.forward(product);
        product.Dispose();
        return y.MoveToOuterDisposeScope();
    }
}
