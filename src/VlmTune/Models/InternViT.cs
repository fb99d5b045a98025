using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace VlmTune.Models;

/// <summary>InternViT (InternVisionModel): patch embedding + CLS + position embedding, then pre-norm encoder layers.</summary>
public sealed class InternVisionModel : nn.Module
{
    public InternVisionEmbeddings embeddings;
    public InternVisionEncoder encoder;

    public InternVisionModel(VisionConfig c, ModelOptions o) : base(nameof(InternVisionModel))
    {
        embeddings = new InternVisionEmbeddings(c, o);
        encoder = new InternVisionEncoder(c, o);
        RegisterComponents();
    }

    /// <summary>
    /// pixels: (N, 3, H, W) → hidden state after the encoder layer that <paramref name="selectLayer"/> picks
    /// (-1: the last, as HF's hidden_states[select_layer] with hidden_states[0] the embeddings).
    /// </summary>
    public Tensor Forward(Tensor pixels, int selectLayer = -1)
    {
        int layers = encoder.layers.Count;
        int stopAfter = selectLayer < 0 ? layers + 1 + selectLayer : selectLayer;   // index into (embeddings, layer1..layerL)
        if (stopAfter < 0 || stopAfter > layers) throw new VlmTuneException($"select_layer {selectLayer} is out of range for {layers} vision layers.");
        var h = embeddings.forward(pixels);
        for (int i = 0; i < stopAfter; i++)
        {
            var next = encoder.layers[i].forward(h);
            h.Dispose();
            h = next;
        }
        return h;
    }
}

public sealed class InternVisionEmbeddings : nn.Module<Tensor, Tensor>
{
    public Parameter class_embedding;     // (1, 1, D)
    public Conv2dPatch patch_embedding;
    public Parameter position_embedding;  // (1, 1 + G·G, D), G = image_size / patch_size
    private readonly VisionConfig _c;

    public InternVisionEmbeddings(VisionConfig c, ModelOptions o) : base(nameof(InternVisionEmbeddings))
    {
        _c = c;
        class_embedding = Init.Empty(o, 1, 1, c.HiddenSize);
        patch_embedding = new Conv2dPatch(c.NumChannels, c.HiddenSize, c.PatchSize, o);
        position_embedding = Init.Empty(o, 1, c.PatchesPerSide * c.PatchesPerSide + 1, c.HiddenSize);
        RegisterComponents();
    }

    public override Tensor forward(Tensor pixels)
    {
        using var scope = NewDisposeScope();
        var patches = patch_embedding.forward(pixels.to_type(patch_embedding.weight.dtype));   // (N, D, h, w)
        long n = patches.shape[0], d = patches.shape[1], h = patches.shape[2], w = patches.shape[3];
        patches = patches.flatten(2).transpose(1, 2);                                          // (N, h·w, D)
        var cls = class_embedding.expand(n, 1, d).to_type(patches.dtype);
        var x = cat([cls, patches], 1);                                                        // (N, 1 + h·w, D)
        var pos = cat([position_embedding[.., ..1, ..], GridPositions(h, w)], 1);
        return (x + pos).MoveToOuterDisposeScope();
    }

    /// <summary>Patch position embeddings for an h×w grid: bicubic-resized (fp32, align_corners=False) when it differs from the trained grid.</summary>
    private Tensor GridPositions(long h, long w)
    {
        var grid = position_embedding[.., 1.., ..];
        int g = _c.PatchesPerSide;
        if (h == g && w == g) return grid;
        var img = grid.to_type(ScalarType.Float32).reshape(1, g, g, -1).permute(0, 3, 1, 2);    // (1, D, G, G)
        var resized = nn.functional.interpolate(img, [h, w], mode: InterpolationMode.Bicubic, align_corners: false);
        return resized.reshape(1, -1, h * w).permute(0, 2, 1).to_type(grid.dtype);             // (1, h·w, D)
    }
}

/// <summary>Non-overlapping patch convolution (kernel = stride = patch size) with weight/bias named as in nn.Conv2d.</summary>
public sealed class Conv2dPatch : nn.Module<Tensor, Tensor>
{
    public Parameter weight;   // (D, C, p, p)
    public Parameter bias;     // (D)
    private readonly long _patch;

    public Conv2dPatch(int channels, int dim, int patch, ModelOptions o) : base(nameof(Conv2dPatch))
    {
        _patch = patch;
        weight = Init.Empty(o, dim, channels, patch, patch);
        bias = Init.Empty(o, dim);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => nn.functional.conv2d(x, weight, bias, strides: [_patch, _patch]);
}

public sealed class InternVisionEncoder : nn.Module
{
    public ModuleList<InternVisionEncoderLayer> layers;

    public InternVisionEncoder(VisionConfig c, ModelOptions o) : base(nameof(InternVisionEncoder))
    {
        layers = new ModuleList<InternVisionEncoderLayer>(Enumerable.Range(0, c.NumHiddenLayers).Select(_ => new InternVisionEncoderLayer(c, o)).ToArray());
        RegisterComponents();
    }
}

public sealed class InternVisionEncoderLayer : nn.Module<Tensor, Tensor>
{
    public InternAttention attn;
    public InternMlp mlp;
    public nn.Module<Tensor, Tensor> norm1;
    public nn.Module<Tensor, Tensor> norm2;
    public Parameter ls1;   // layer scale of the attention branch
    public Parameter ls2;   // layer scale of the MLP branch

    public InternVisionEncoderLayer(VisionConfig c, ModelOptions o) : base(nameof(InternVisionEncoderLayer))
    {
        attn = new InternAttention(c, o);
        mlp = new InternMlp(c, o);
        norm1 = MakeNorm(c, o);
        norm2 = MakeNorm(c, o);
        ls1 = Init.Empty(o, c.HiddenSize);
        ls2 = Init.Empty(o, c.HiddenSize);
        RegisterComponents();
    }

    internal static nn.Module<Tensor, Tensor> MakeNorm(VisionConfig c, ModelOptions o) =>
        c.NormType == "layer_norm" ? new LayerNorm(c.HiddenSize, c.LayerNormEps, o) : new RmsNorm(c.HiddenSize, c.LayerNormEps, o);

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        x = x + attn.forward(norm1.forward(x)) * ls1;
        x = x + mlp.forward(norm2.forward(x)) * ls2;
        return x.MoveToOuterDisposeScope();
    }
}

public sealed class InternAttention : nn.Module<Tensor, Tensor>
{
    public Linear qkv;
    public Linear proj;
    public RmsNorm? q_norm;
    public RmsNorm? k_norm;
    private readonly VisionConfig _c;
    private readonly AttentionKind _kind;

    public InternAttention(VisionConfig c, ModelOptions o) : base(nameof(InternAttention))
    {
        _c = c; _kind = o.Attention;
        qkv = new Linear(c.HiddenSize, 3L * c.HiddenSize, c.QkvBias, o);
        proj = new Linear(c.HiddenSize, c.HiddenSize, true, o);
        if (c.QkNormalization)
        {
            q_norm = new RmsNorm(c.HiddenSize, c.LayerNormEps, o);
            k_norm = new RmsNorm(c.HiddenSize, c.LayerNormEps, o);
        }
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], n = x.shape[1], heads = _c.NumAttentionHeads, d = _c.HeadDim;
        var qkvOut = qkv.forward(x).view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4);   // (3, B, H, N, d)
        Tensor q = qkvOut[0], k = qkvOut[1], v = qkvOut[2];
        if (q_norm is not null)
        {
            // qk-normalisation runs over all heads together: (B, H, N, d) → (B, N, H·d) → norm → back.
            q = q_norm.forward(q.transpose(1, 2).flatten(-2)).view(b, n, heads, d).transpose(1, 2);
            k = k_norm!.forward(k.transpose(1, 2).flatten(-2)).view(b, n, heads, d).transpose(1, 2);
        }
        var o = Attention.Compute(q, k, v, _kind, causalOffset: null, keyMask: null);       // (B, H, N, d)
        return proj.forward(o.transpose(1, 2).reshape(b, n, heads * d)).MoveToOuterDisposeScope();
    }
}

public sealed class InternMlp : nn.Module<Tensor, Tensor>
{
    public Linear fc1;
    public Linear fc2;

    public InternMlp(VisionConfig c, ModelOptions o) : base(nameof(InternMlp))
    {
        fc1 = new Linear(c.HiddenSize, c.IntermediateSize, true, o);
        fc2 = new Linear(c.IntermediateSize, c.HiddenSize, true, o);
        RegisterComponents();
    }

    // Exact (erf) GELU, as the official "gelu" activation.
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var hidden = fc1.forward(x);
        var act = nn.functional.gelu(hidden);
        hidden.Dispose();   // freed now under no_grad (the frozen ViT), kept by autograd when it trains
        var y = fc2.forward(act);
        act.Dispose();
        return y.MoveToOuterDisposeScope();
    }
}
