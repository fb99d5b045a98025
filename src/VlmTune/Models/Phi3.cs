using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace VlmTune.Models;

/// <summary>
/// Phi3ForCausalLM (InternVL2-4B's Phi-3-mini-128k): the Llama layout with q/k/v fused into one <c>qkv_proj</c> and
/// gate/up into one <c>gate_up_proj</c>, and longrope scaling of the 128k-context models (<see cref="RotaryEmbedding"/>).
/// </summary>
public sealed class Phi3ForCausalLM : CausalLanguageModel
{
    public HfModel<Phi3Attention, Phi3Mlp> model;
    public Linear lm_head;

    private readonly IReadOnlyList<DecoderLayer> _layers;

    public Phi3ForCausalLM(LlmConfig c, ModelOptions o) : base(nameof(Phi3ForCausalLM), c)
    {
        if (c.TieWordEmbeddings) throw new VlmTuneException("llm_config.tie_word_embeddings is true, but Phi-3 checkpoints store lm_head.");
        model = new HfModel<Phi3Attention, Phi3Mlp>(c, o, i => new Phi3Attention(c, o, i), () => new Phi3Mlp(c, o));
        lm_head = new Linear(c.HiddenSize, c.VocabSize, false, o);
        RegisterComponents();
        _layers = [.. model.layers];
    }

    public override Embedding TokenEmbedding => model.embed_tokens;
    public override Linear OutputHead => lm_head;
    public override string OutputHeadName => nameof(lm_head);
    public override IReadOnlyList<DecoderLayer> Layers => _layers;
    public override nn.Module LayerStack => model.layers;
    public override RotaryEmbedding Rotary => model.Rotary;
    public override RmsNorm FinalNorm => model.norm;
    public override IReadOnlyList<string> OfficialLoraTargets { get; } = ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"];
}

public sealed class Phi3Attention : nn.Module, IAttention
{
    public Linear qkv_proj;
    public Linear o_proj;
    private readonly LlmConfig _c;
    private readonly AttentionKind _kind;
    private readonly int _layer;

    public Phi3Attention(LlmConfig c, ModelOptions o, int layer) : base(nameof(Phi3Attention))
    {
        _c = c; _kind = o.Attention; _layer = layer;
        qkv_proj = new Linear(c.HiddenSize, (long)(c.NumAttentionHeads + 2 * c.NumKeyValueHeads) * c.HeadDim, c.QkvBias, o);
        o_proj = new Linear((long)c.NumAttentionHeads * c.HeadDim, c.HiddenSize, c.OutputProjBias, o);
        RegisterComponents();
    }

    public Tensor Forward(Tensor x, RotaryTables rope, DecoderInputs inputs)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1], d = _c.HeadDim, heads = _c.NumAttentionHeads, kvh = _c.NumKeyValueHeads;
        // qkv_proj stacks all query heads, then all key heads, then all value heads (unlike InternLM2's per-group wqkv).
        var qkv = qkv_proj.forward(x).split([heads * d, kvh * d, kvh * d], -1);
        var q = rope.Apply(qkv[0].view(b, t, heads, d).transpose(1, 2));                         // (B, H, T, d)
        var k = rope.Apply(qkv[1].view(b, t, kvh, d).transpose(1, 2));                           // (B, kvh, T, d)
        var v = qkv[2].view(b, t, kvh, d).transpose(1, 2);                                       // (B, kvh, T, d)
        var o = GroupedAttention.Compute(q, k, v, _layer, _kind, inputs);                       // (B, H, T, d)
        return o_proj.forward(o.transpose(1, 2).reshape(b, t, heads * d)).MoveToOuterDisposeScope();
    }
}

public sealed class Phi3Mlp : nn.Module<Tensor, Tensor>
{
    public Linear gate_up_proj;
    public Linear down_proj;

    public Phi3Mlp(LlmConfig c, ModelOptions o) : base(nameof(Phi3Mlp))
    {
        if (c.HiddenAct != "silu") throw new VlmTuneException($"llm_config.hidden_act '{c.HiddenAct}' is not supported (silu).");
        gate_up_proj = new Linear(c.HiddenSize, 2L * c.IntermediateSize, c.MlpBias, o);
        down_proj = new Linear(c.IntermediateSize, c.HiddenSize, c.MlpBias, o);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var gateUp = gate_up_proj.forward(x).chunk(2, -1);                                       // gate first, then up
        var product = SwiGlu.Apply(gateUp[0], gateUp[1]);
        var y = down_proj.forward(product);
        product.Dispose();
        return y.MoveToOuterDisposeScope();
    }
}
