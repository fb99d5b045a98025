using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace VlmTune.Models;

/// <summary>Compute dtype and device a model is built for, and which attention kernel it uses.</summary>
public sealed record ModelOptions
{
    public Device Device { get; init; } = CPU;
    /// <summary>Dtype of weights and activations. Float32 on CPU (exact parity), BFloat16 on CUDA by default.</summary>
    public ScalarType DType { get; init; } = ScalarType.Float32;
    public AttentionKind Attention { get; init; } = AttentionKind.Sdpa;

    /// <summary>The compute dtype when none is asked for: bfloat16 on CUDA, float32 (exact parity) on the CPU.</summary>
    public static ScalarType DefaultDType(Device device) => device.type == DeviceType.CUDA ? ScalarType.BFloat16 : ScalarType.Float32;
}

public enum AttentionKind
{
    /// <summary>TorchSharp's scaled_dot_product_attention (flash / memory-efficient kernels on CUDA).</summary>
    Sdpa,
    /// <summary>Explicit matmul + fp32 softmax, as the official eager code: for parity tests.</summary>
    Exact,
}

internal static class Init
{
    /// <summary>
    /// −∞ as a long-lived Scalar, made once. (A temporary one could be finalised while libtorch still read it; the build's
    /// deferred Scalar free now covers every Scalar: docs/torchsharp-scalar-race.md.)
    /// </summary>
    public static readonly Scalar NegativeInfinity = float.NegativeInfinity.ToScalar();

    /// <summary>An uninitialised parameter: weights always come from a checkpoint (or an explicit initialiser).</summary>
    public static Parameter Empty(ModelOptions o, params long[] shape) =>
        Owned(empty(shape, o.DType, o.Device), requiresGrad: false);

    /// <summary>A parameter owned by its module, never by whatever dispose scope happens to be open while it is built.</summary>
    public static Parameter Owned(Tensor value, bool requiresGrad)
    {
        var p = new Parameter(value.DetachFromDisposeScope(), requires_grad: requiresGrad);
        p.DetachFromDisposeScope();
        return p;
    }
}

/// <summary>
/// y = x Wᵀ + b, with an optional LoRA branch kept under PEFT's names (<c>lora_A.weight</c>, <c>lora_B.weight</c>) so that
/// base checkpoints load unchanged and adapters map one to one. Adapters served side by side keep their branches outside
/// the layer and reach it per row through <see cref="LoraRouting"/>.
/// </summary>
public sealed class Linear : nn.Module<Tensor, Tensor>
{
    public Parameter weight;
    public Parameter? bias;
    public LoraWeight? lora_A;
    public LoraWeight? lora_B;

    public long InFeatures { get; }
    public long OutFeatures { get; private set; }
    /// <summary>PEFT's scaling = alpha / r.</summary>
    public double LoraScaling { get; private set; }
    public double LoraDropout { get; private set; }

    /// <summary>When set, supplies the weight in place of <see cref="weight"/> (e.g. dequantised NF4 storage).</summary>
    public Func<Tensor>? WeightProvider { get; set; }

    /// <summary>
    /// When set, computes the base projection x Wᵀ (+ b) in place of the stored weight, e.g. NF4 storage with a custom
    /// backward that dequantises again instead of keeping the dequantised weight alive. The LoRA branch still applies.
    /// </summary>
    public Func<Tensor, Tensor>? BaseForward { get; set; }

    /// <summary>
    /// false (PEFT): the LoRA branch runs in its weights' dtype (fp32 adapters: the input is widened to fp32).
    /// true (torch.autocast / DeepSpeed bf16, what XTuner trains with): it runs in the input's dtype, the fp32 weights
    /// cast down per call and their gradients accumulated in fp32. For bf16 training this keeps the activations and the
    /// matmuls in bf16 (tensor cores) instead of fp32 copies of every LoRA input.
    /// </summary>
    public bool LoraAutocast { get; set; }

    public Linear(long inFeatures, long outFeatures, bool hasBias, ModelOptions o) : base(nameof(Linear))
    {
        InFeatures = inFeatures; OutFeatures = outFeatures;
        weight = Init.Empty(o, outFeatures, inFeatures);
        bias = hasBias ? Init.Empty(o, outFeatures) : null;
        RegisterComponents();
    }

    /// <summary>
    /// An output head tied to the token embeddings (<c>tie_word_embeddings</c>): it reads <paramref name="sharedWeight"/>
    /// at every call (so it follows the embedding through dtype or device moves) and stores nothing of its own.
    /// </summary>
    public static Linear Tied(Func<Tensor> sharedWeight, long inFeatures, long outFeatures, ModelOptions o)
    {
        var head = new Linear(inFeatures, 0, hasBias: false, o) { WeightProvider = sharedWeight };
        head.OutFeatures = outFeatures;
        return head;
    }

    public bool HasLora => lora_A is not null;

    /// <summary>The linear layers under <paramref name="scope"/>, by module path (LoRA, QLoRA and merging walk these).</summary>
    public static IEnumerable<(string Name, Linear Linear)> AllIn(nn.Module scope) =>
        scope.named_modules().Where(m => m.module is Linear).Select(m => (m.name, (Linear)m.module));

    /// <summary>Adds a LoRA branch of rank r (A: [r, in], B: [out, r]); B starts at zero as PEFT does.</summary>
    public void AddLora(int r, double alpha, double dropout, ScalarType dtype)
    {
        var device = weight.device;
        lora_A = new LoraWeight(empty(new long[] { r, InFeatures }, dtype, device));
        lora_B = new LoraWeight(zeros(new long[] { OutFeatures, r }, dtype, device));
        using (no_grad())
        {
            // PEFT's default init: kaiming_uniform_(a=sqrt(5)) for A, i.e. U(-1/sqrt(in), 1/sqrt(in)).
            double bound = 1.0 / Math.Sqrt(InFeatures);
            lora_A.weight.uniform_(-bound, bound);
        }
        register_module(nameof(lora_A), lora_A);
        register_module(nameof(lora_B), lora_B);
        LoraScaling = alpha / r;
        LoraDropout = dropout;
    }

    /// <summary>Drops the LoRA branch (after merging it into the weight, or to undo <see cref="AddLora"/>).</summary>
    public void RemoveLora()
    {
        if (lora_A is null) return;
        lora_A.Dispose(); lora_B!.Dispose();
        lora_A = null; lora_B = null;
        // TorchSharp unregisters a child module when it is registered again as null.
        register_module(nameof(lora_A), null!);
        register_module(nameof(lora_B), null!);
        LoraScaling = 0; LoraDropout = 0;
    }

    public override Tensor forward(Tensor x)
    {
        if (LoraRouting.Current is not { } routing) return ForwardOwn(x);
        // Served adapters (batched LoRA): the base product once for the whole batch, then each row group's delta.
        using var scope = NewDisposeScope();
        return routing.Apply(this, x, ForwardOwn(x)).MoveToOuterDisposeScope();
    }

    /// <summary>The base projection plus this layer's own LoRA branch, if it has one.</summary>
    private Tensor ForwardOwn(Tensor x)
    {
        if (lora_A is null) return BaseForward is not null ? BaseForward(x) : nn.functional.linear(x, WeightProvider?.Invoke() ?? weight, bias);
        // A scope of its own: the base output, the LoRA branch and its scaled copy are freed here, not at the end of
        // the caller's layer (under no_grad they are garbage at once; with autograd the graph keeps what it needs).
        using var scope = NewDisposeScope();
        var y = BaseForward is not null ? BaseForward(x) : nn.functional.linear(x, WeightProvider?.Invoke() ?? weight, bias);
        var h = LoraDropout > 0 && training ? nn.functional.dropout(x, LoraDropout, true) : x;
        // y + scaling·delta in one kernel (one rounding; the same bits as scaling, then adding, when scaling is a power
        // of two, as alpha = 2r is): one launch less per LoRA linear in the forward, the recompute and the backward,
        // and short samples are bound by the host issuing launches.
        if (LoraAutocast && h.dtype != lora_A.weight.dtype)
            return y.add(nn.functional.linear(nn.functional.linear(h, lora_A.weight.to_type(h.dtype)), lora_B!.weight.to_type(h.dtype)), LoraScaling).MoveToOuterDisposeScope();
        h = h.to_type(lora_A.weight.dtype);
        var delta = nn.functional.linear(nn.functional.linear(h, lora_A.weight), lora_B!.weight);
        return (y + (delta * LoraScaling).to_type(y.dtype)).MoveToOuterDisposeScope();
    }
}

/// <summary>Holds one LoRA matrix under the parameter name PEFT uses ("weight").</summary>
public sealed class LoraWeight : nn.Module
{
    public Parameter weight;

    public LoraWeight(Tensor value) : base(nameof(LoraWeight))
    {
        weight = Init.Owned(value, requiresGrad: true);
        RegisterComponents();
    }
}

public sealed class Embedding : nn.Module<Tensor, Tensor>
{
    public Parameter weight;

    public Embedding(long count, long dim, ModelOptions o) : base(nameof(Embedding))
    {
        weight = Init.Empty(o, count, dim);
        RegisterComponents();
    }

    // ids: (B, T) → (B, T, D)
    public override Tensor forward(Tensor ids) =>
        weight.index_select(0, ids.reshape(-1)).view(ids.shape.Append(weight.shape[1]).ToArray());
}

/// <summary>LayerNorm computed in fp32 and returned in the input dtype.</summary>
public sealed class LayerNorm : nn.Module<Tensor, Tensor>
{
    public Parameter weight;
    public Parameter bias;
    private readonly double _eps;

    public LayerNorm(long dim, double eps, ModelOptions o) : base(nameof(LayerNorm))
    {
        weight = Init.Empty(o, dim); bias = Init.Empty(o, dim); _eps = eps;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        if (x.dtype == ScalarType.Float32) return nn.functional.layer_norm(x, [x.shape[^1]], weight, bias, _eps);
        using var scope = NewDisposeScope();
        var y = nn.functional.layer_norm(x.to_type(ScalarType.Float32), [x.shape[^1]], weight.to_type(ScalarType.Float32), bias.to_type(ScalarType.Float32), _eps);
        return y.to_type(x.dtype).MoveToOuterDisposeScope();
    }
}

/// <summary>RMSNorm as InternLM2 / InternViT define it: normalise in fp32, cast back, then scale by the weight.</summary>
public sealed class RmsNorm : nn.Module<Tensor, Tensor>
{
    public Parameter weight;
    private readonly double _eps;

    public RmsNorm(long dim, double eps, ModelOptions o) : base(nameof(RmsNorm))
    {
        weight = Init.Empty(o, dim); _eps = eps;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = x.to_type(ScalarType.Float32);
        var variance = h.pow(2).mean([-1L], keepdim: true);
        h = h * rsqrt(variance + _eps);
        return (weight * h.to_type(x.dtype)).MoveToOuterDisposeScope();
    }
}

internal static class Attention
{
    /// <summary>
    /// softmax(q kᵀ / √d + mask) v for q: (B, H, T, d), k/v: (B, H, S, d). <paramref name="causalOffset"/> ≥ 0 applies a
    /// causal mask where query i sees keys ≤ i + offset; <paramref name="keyMask"/> (B, S) bool marks usable keys.
    /// </summary>
    public static Tensor Compute(Tensor q, Tensor k, Tensor v, AttentionKind kind, long? causalOffset, Tensor? keyMask)
    {
        long T = q.shape[2], S = k.shape[2];
        bool plainCausal = causalOffset == 0 && T == S && keyMask is null;
        if (kind == AttentionKind.Sdpa && (causalOffset is null || plainCausal) && keyMask is null)
            return nn.functional.scaled_dot_product_attention(q, k, v, null, 0.0, plainCausal);

        using var scope = NewDisposeScope();
        Tensor? allowed = null;   // (B or 1, 1, T, S) bool
        if (causalOffset is { } off)
        {
            var qi = arange(T, device: q.device).unsqueeze(1) + off;
            var kj = arange(S, device: q.device).unsqueeze(0);
            allowed = (kj <= qi).view(1, 1, T, S);
        }
        if (keyMask is not null)
        {
            var km = keyMask.to_type(ScalarType.Bool).view(keyMask.shape[0], 1, 1, S);
            allowed = allowed is null ? km : allowed.logical_and(km);
            // A left-padding query of a batched prefill may see no key at all: softmax over nothing is NaN, and its NaN
            // keys/values would reach real rows through 0 · NaN in the next layer. Such a query attends to itself.
            if (T > 1 && causalOffset is { } diagonalOffset)
            {
                var blind = allowed.any(-1, keepdim: true).logical_not();                          // (B, 1, T, 1)
                var self = (arange(S, device: q.device).unsqueeze(0) == arange(T, device: q.device).unsqueeze(1) + diagonalOffset).view(1, 1, T, S);
                allowed = allowed.logical_or(blind.logical_and(self));
            }
        }
        if (kind == AttentionKind.Sdpa)
            return nn.functional.scaled_dot_product_attention(q, k, v, allowed, 0.0, false).MoveToOuterDisposeScope();

        var scores = matmul(q, k.transpose(2, 3)) / Math.Sqrt(q.shape[^1]);
        if (allowed is not null)
            scores = scores.masked_fill(allowed.logical_not(), Init.NegativeInfinity);
        var probs = scores.softmax(-1, ScalarType.Float32).to_type(q.dtype);
        return matmul(probs, v).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Attention over packed rows, q/k/v: (R, H, T, d): causal within each sample of <paramref name="rows"/>, never across
    /// samples; a row's padding tail gets zeros. The samples are gathered into one right-padded (samples, H, L, d) batch,
    /// L the longest sample, for one causal call: causality alone keeps each real query off the padding (it comes after
    /// every real key), so no mask is needed and SDPA keeps its flash kernel on CUDA. One call per layer instead of one
    /// per sample (short samples were bound by those launches); the padding adds (L² − len²) per sample of attention
    /// work, small beside the projections at these lengths.
    /// </summary>
    public static Tensor ComputePacked(Tensor q, Tensor k, Tensor v, AttentionKind kind, PackedRows rows)
    {
        using var scope = NewDisposeScope();
        long r = q.shape[0], h = q.shape[1], t = q.shape[2], dv = v.shape[3], n = rows.Samples, l = rows.LongestSample;
        var (gather, scatter) = rows.AttentionIndex(q.device);
        // (R, H, T, d) → (R·T, H, d) token slots → (samples, H, L, d)
        Tensor Grouped(Tensor x) =>
            x.transpose(1, 2).reshape(r * t, h, x.shape[3]).index_select(0, gather).view(n, l, h, x.shape[3]).transpose(1, 2);
        var grouped = Compute(Grouped(q), Grouped(k), Grouped(v), kind, causalOffset: 0, keyMask: null);   // (samples, H, L, dv)
        var slots = cat([grouped.transpose(1, 2).reshape(n * l, h, dv), zeros(1, h, dv, v.dtype, q.device)], 0);
        return slots.index_select(0, scatter).view(r, t, h, dv).transpose(1, 2).MoveToOuterDisposeScope();   // (R, H, T, dv)
    }
}
