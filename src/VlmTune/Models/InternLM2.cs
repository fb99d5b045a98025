using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace VlmTune.Models;

/// <summary>InternLM2ForCausalLM: token embeddings, decoder layers, final RMSNorm and an untied output head.</summary>
public sealed class InternLM2ForCausalLM : nn.Module
{
    public InternLM2Model model;
    public Linear output;

    public LlmConfig Config { get; }

    public InternLM2ForCausalLM(LlmConfig c, ModelOptions o) : base(nameof(InternLM2ForCausalLM))
    {
        Config = c;
        model = new InternLM2Model(c, o);
        output = new Linear(c.HiddenSize, c.VocabSize, false, o);
        RegisterComponents();
    }

    public Tensor Embed(Tensor ids) => model.tok_embeddings.forward(ids);

    /// <summary>Final hidden states (B, T, D) for input embeddings (B, T, D).</summary>
    public Tensor Forward(Tensor inputsEmbeds, DecoderInputs inputs) => model.Forward(inputsEmbeds, inputs);

    /// <summary>Logits (…, V) of hidden states; the caller picks which positions need them.</summary>
    public Tensor Logits(Tensor hidden) => output.forward(hidden);
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
}

public sealed class InternLM2Model : nn.Module
{
    public Embedding tok_embeddings;
    public ModuleList<InternLM2DecoderLayer> layers;
    public RmsNorm norm;

    public RotaryEmbedding Rotary { get; }

    /// <summary>Checkpoint each decoder layer in training (recompute activations in backward) to save memory.</summary>
    public Func<InternLM2DecoderLayer, Tensor, RotaryTables, DecoderInputs, Tensor>? LayerRunner { get; set; }

    public InternLM2Model(LlmConfig c, ModelOptions o) : base(nameof(InternLM2Model))
    {
        tok_embeddings = new Embedding(c.VocabSize, c.HiddenSize, o);
        layers = new ModuleList<InternLM2DecoderLayer>(Enumerable.Range(0, c.NumHiddenLayers).Select(i => new InternLM2DecoderLayer(c, o, i)).ToArray());
        norm = new RmsNorm(c.HiddenSize, c.RmsNormEps, o);
        Rotary = new RotaryEmbedding(c);
        RegisterComponents();
    }

    public Tensor Forward(Tensor x, DecoderInputs inputs)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1];
        long past = inputs.Cache?.Length ?? 0;
        if (inputs.Packing is { } packing && (inputs.Cache is not null || inputs.KeyMask is not null || packing.Rows != b || packing.RowLength != t))
            throw new ArgumentException($"packed rows ({packing.Rows} × {packing.RowLength}) need a full pass over (B, T) = ({b}, {t}) embeddings without cache or key mask.");
        var positions = inputs.PositionIds ?? inputs.Packing?.PositionIds(x.device) ?? arange(past, past + t, device: x.device).unsqueeze(0).expand(b, t);
        var rope = Rotary.Tables(positions, inputs.Packing?.LongestSample ?? past + t, x.dtype);
        inputs.Cache?.Rerotate(Rotary, rope.Theta);
        for (int i = 0; i < layers.Count; i++)
        {
            var next = LayerRunner is null ? layers[i].Forward(x, rope, inputs) : LayerRunner(layers[i], x, rope, inputs);
            // Release our handle on the previous layer's output now (autograd keeps what it saved): with activation
            // offloading nothing else holds it, and the GPU need not keep every layer's output until the last layer.
            if (i > 0) x.Dispose();
            x = next;
        }
        inputs.Cache?.Advance(positions, rope.Theta);
        return norm.forward(x).MoveToOuterDisposeScope();
    }
}

public sealed class InternLM2DecoderLayer : nn.Module
{
    public InternLM2Attention attention;
    public InternLM2Mlp feed_forward;
    public RmsNorm attention_norm;
    public RmsNorm ffn_norm;

    public int Index { get; }

    public InternLM2DecoderLayer(LlmConfig c, ModelOptions o, int index) : base(nameof(InternLM2DecoderLayer))
    {
        Index = index;
        attention = new InternLM2Attention(c, o, index);
        feed_forward = new InternLM2Mlp(c, o);
        attention_norm = new RmsNorm(c.HiddenSize, c.RmsNormEps, o);
        ffn_norm = new RmsNorm(c.HiddenSize, c.RmsNormEps, o);
        RegisterComponents();
    }

    public Tensor Forward(Tensor x, RotaryTables rope, DecoderInputs inputs)
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
        if (inputs.Cache is { } cache) (k, v) = cache.Append(_layer, k, v);                    // (B, kvh, S, d)
        long s = k.shape[2];

        Tensor o;
        if (inputs.Packing is { } packing)
        {
            k = RepeatKv(k, groups); v = RepeatKv(v, groups);                                    // (B, H, T, d)
            o = Attention.ComputePacked(q, k, v, _kind, packing);
        }
        else if (t == 1)
        {
            // Decoding: fold each KV head's query group into the query axis, so K/V are read once and never repeated.
            var qg = q.view(b, kvh, groups, d);                                                  // (B, kvh, groups, d)
            o = Attention.Compute(qg, k, v, _kind, causalOffset: null, keyMask: inputs.KeyMask).reshape(b, heads, 1, d);
        }
        else
        {
            k = RepeatKv(k, groups); v = RepeatKv(v, groups);                                    // (B, H, S, d)
            o = Attention.Compute(q, k, v, _kind, causalOffset: s - t, keyMask: inputs.KeyMask);
        }
        return wo.forward(o.transpose(1, 2).reshape(b, t, heads * d)).MoveToOuterDisposeScope();
    }

    private static Tensor RepeatKv(Tensor x, long groups)
    {
        if (groups == 1) return x;
        long b = x.shape[0], h = x.shape[1], s = x.shape[2], d = x.shape[3];
        return x.unsqueeze(2).expand(b, h, groups, s, d).reshape(b, h * groups, s, d);
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
        // Handles released as soon as each (tokens × intermediate) tensor is consumed: without autograd they are then
        // freed, so the MLP peaks at three of them rather than holding every one until it returns.
        var gate = w1.forward(x);
        var act = nn.functional.silu(gate);
        gate.Dispose();
        var up = w3.forward(x);
        var product = act * up;
        act.Dispose(); up.Dispose();
        var y = w2.forward(product);
        product.Dispose();
        return y.MoveToOuterDisposeScope();
    }
}
