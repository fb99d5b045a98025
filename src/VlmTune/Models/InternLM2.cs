using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace VlmTune.Models;

/// <summary>InternLM2ForCausalLM: token embeddings, decoder layers, final RMSNorm and an untied output head.</summary>
public sealed class InternLM2ForCausalLM : CausalLanguageModel
{
    public InternLM2Model model;
    public Linear output;

    public InternLM2ForCausalLM(LlmConfig c, ModelOptions o) : base(nameof(InternLM2ForCausalLM), c)
    {
        model = new InternLM2Model(c, o);
        output = new Linear(c.HiddenSize, c.VocabSize, false, o);
        RegisterComponents();
        _layers = [.. model.layers];
    }

    private readonly IReadOnlyList<DecoderLayer> _layers;

    public override Embedding TokenEmbedding => model.tok_embeddings;
    public override Linear OutputHead => output;
    public override string OutputHeadName => nameof(output);
    public override IReadOnlyList<DecoderLayer> Layers => _layers;
    public override nn.Module LayerStack => model.layers;
    public override RotaryEmbedding Rotary => model.Rotary;
    public override RmsNorm FinalNorm => model.norm;
    public override IReadOnlyList<string> OfficialLoraTargets { get; } = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"];
}

public sealed class InternLM2Model : nn.Module
{
    public Embedding tok_embeddings;
    public ModuleList<InternLM2DecoderLayer> layers;
    public RmsNorm norm;

    public RotaryEmbedding Rotary { get; }

    public InternLM2Model(LlmConfig c, ModelOptions o) : base(nameof(InternLM2Model))
    {
        tok_embeddings = new Embedding(c.VocabSize, c.HiddenSize, o);
        layers = new ModuleList<InternLM2DecoderLayer>(Enumerable.Range(0, c.NumHiddenLayers).Select(i => new InternLM2DecoderLayer(c, o, i)).ToArray());
        norm = new RmsNorm(c.HiddenSize, c.RmsNormEps, o);
        Rotary = new RotaryEmbedding(c);
        RegisterComponents();
    }
}

public sealed class InternLM2DecoderLayer : DecoderLayer
{
    public InternLM2Attention attention;
    public InternLM2Mlp feed_forward;
    public RmsNorm attention_norm;
    public RmsNorm ffn_norm;

    public InternLM2DecoderLayer(LlmConfig c, ModelOptions o, int index) : base(nameof(InternLM2DecoderLayer), index)
    {
        attention = new InternLM2Attention(c, o, index);
        feed_forward = new InternLM2Mlp(c, o);
        attention_norm = new RmsNorm(c.HiddenSize, c.RmsNormEps, o);
        ffn_norm = new RmsNorm(c.HiddenSize, c.RmsNormEps, o);
        RegisterComponents();
    }

    public override Tensor Forward(Tensor x, RotaryTables rope, DecoderInputs inputs)
    {
        using var scope = NewDisposeScope();
        var h = x + attention.Forward(attention_norm.forward(x), rope, inputs);
        return (h + feed_forward.forward(ffn_norm.forward(h))).MoveToOuterDisposeScope();
    }
}

public sealed class InternLM2Attention : nn.Module
{
    public Linear wqkv;
    public Linear wo;
    private readonly LlmConfig _c;
    private readonly AttentionKind _kind;
    private readonly int _layer;

    public InternLM2Attention(LlmConfig c, ModelOptions o, int layer) : base(nameof(InternLM2Attention))
    {
        _c = c; _kind = o.Attention; _layer = layer;
        wqkv = new Linear(c.HiddenSize, (long)(c.NumAttentionHeads + 2 * c.NumKeyValueHeads) * c.HeadDim, c.Bias, o);
        wo = new Linear((long)c.NumAttentionHeads * c.HeadDim, c.HiddenSize, c.Bias, o);
        RegisterComponents();
    }

    public Tensor Forward(Tensor x, RotaryTables rope, DecoderInputs inputs)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1], d = _c.HeadDim, kvh = _c.NumKeyValueHeads, groups = _c.KeyValueGroups, heads = _c.NumAttentionHeads;
        // wqkv packs, per KV head, its `groups` query heads then its key and value: (h gs d) with gs = groups + 2.
        var qkv = wqkv.forward(x).view(b, t, kvh, groups + 2, d);
        var q = qkv[.., .., .., ..(int)groups, ..].reshape(b, t, heads, d).transpose(1, 2);   // (B, H, T, d)
        var k = qkv[.., .., .., groups, ..].transpose(1, 2);                                     // (B, kvh, T, d)
        var v = qkv[.., .., .., groups + 1, ..].transpose(1, 2);                                 // (B, kvh, T, d)
        q = rope.Apply(q);
        k = rope.Apply(k);
        var o = GroupedAttention.Compute(q, k, v, _layer, _kind, inputs);                       // (B, H, T, d)
        return wo.forward(o.transpose(1, 2).reshape(b, t, heads * d)).MoveToOuterDisposeScope();
    }
}

public sealed class InternLM2Mlp : nn.Module<Tensor, Tensor>
{
    public Linear w1;   // gate
    public Linear w3;   // up
    public Linear w2;   // down

    public InternLM2Mlp(LlmConfig c, ModelOptions o) : base(nameof(InternLM2Mlp))
    {
        if (c.HiddenAct != "silu") throw new VlmTuneException($"llm_config.hidden_act '{c.HiddenAct}' is not supported (silu).");
        w1 = new Linear(c.HiddenSize, c.IntermediateSize, false, o);
        w3 = new Linear(c.HiddenSize, c.IntermediateSize, false, o);
        w2 = new Linear(c.IntermediateSize, c.HiddenSize, false, o);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var product = SwiGlu.Apply(w1.forward(x), w3.forward(x));
        var y = w2.forward(product);
        product.Dispose();
        return y.MoveToOuterDisposeScope();
    }
}
