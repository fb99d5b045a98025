using System.Runtime.CompilerServices;
using TorchSharp;
using VlmTune.Cuda;
using VlmTune.Models;
using static TorchSharp.torch;
using Linear = VlmTune.Models.Linear;
using Parameter = TorchSharp.Modules.Parameter;

namespace VlmTune.Inference;

/// <summary>
/// Launch shapes of the fused decode kernels (src/VlmTune/Cuda/Kernels/decode.cu); pure arithmetic, so it is tested on the CPU.
/// </summary>
public static class FusedDecodePlan
{
    /// <summary>Threads per GEMV block (8 warps).</summary>
    public const int GemvBlock = 256;
    /// <summary>Keys per attention split; also the attention block size.</summary>
    public const int AttentionChunk = 128;
    /// <summary>Largest batch one GEMV block serves; bigger batches add grid rows.</summary>
    public const int MaxBatchBucket = 32;

    /// <summary>The batch rows one GEMV kernel variant is compiled for: the next power of two, at most 32.</summary>
    public static int BatchBucket(int batch)
    {
        if (batch < 1) throw new ArgumentOutOfRangeException(nameof(batch), batch, "must be ≥ 1");
        int bucket = 1;
        while (bucket < batch && bucket < MaxBatchBucket) bucket *= 2;
        return bucket;
    }

    /// <summary>Output rows per warp: each lane holds rows × bucket fp32 accumulators, kept at ≤ 32 (4 rows for small batches).</summary>
    public static int RowsPerWarp(int bucket) => Math.Clamp(32 / bucket, 1, 4);

    /// <summary>Grid of a plain / residual GEMV with <paramref name="outFeatures"/> rows for <paramref name="batch"/> rows.</summary>
    public static (uint X, uint Y, uint Z) GemvGrid(long outFeatures, int batch)
    {
        int bucket = BatchBucket(batch);
        long warps = CeilDiv(outFeatures, RowsPerWarp(bucket));
        return ((uint)CeilDiv(warps, GemvBlock / 32), (uint)CeilDiv(batch, bucket), 1);
    }

    /// <summary>Grid of the gated (w1, w3) GEMV: one warp per output feature.</summary>
    public static (uint X, uint Y, uint Z) GatedGrid(long outFeatures, int batch) =>
        ((uint)CeilDiv(outFeatures, GemvBlock / 32), (uint)CeilDiv(batch, BatchBucket(batch)), 1);

    /// <summary>Warps of a tensor-core GEMV block (they split K between them).</summary>
    public const int MmaWarps = 8;

    /// <summary>
    /// Whether a batch uses the tensor-core GEMV (mma.sync, sm_80+): from 8 rows on, where the CUDA-core kernel's
    /// per-row FMAs and input unpacking start to cost more than streaming the weights. K must be a multiple of 32.
    /// <see cref="FusedDecodeTuning.TensorCores"/> false keeps the CUDA-core GEMV.
    /// </summary>
    public static bool UseTensorCores(int batch, (int Major, int Minor) arch, LlmConfig c, FusedDecodeTuning? tuning = null) =>
        (tuning ?? FusedDecodeTuning.Default).TensorCores && BatchBucket(batch) >= 8 && arch.Major >= 8
        && c.HiddenSize % 32 == 0 && c.IntermediateSize % 32 == 0 && c.NumAttentionHeads * c.HeadDim % 32 == 0;

    /// <summary>Grid of a tensor-core GEMV: one block per 16 output rows (per batch bucket).</summary>
    public static (uint X, uint Y, uint Z) MmaGrid(long outFeatures, int batch) =>
        ((uint)CeilDiv(outFeatures, 16), (uint)CeilDiv(batch, BatchBucket(batch)), 1);

    /// <summary>Attention splits over <paramref name="keys"/> cached keys (the new one included).</summary>
    public static int AttentionSplits(long keys) => (int)CeilDiv(keys, AttentionChunk);

    /// <summary>Compile-time defines of the kernel module for a model's head shape and a batch bucket (unrolling: the tuning's, if set).</summary>
    public static IReadOnlyDictionary<string, int> Defines(LlmConfig c, int bucket, FusedDecodeTuning? tuning = null) => new Dictionary<string, int>
    {
        // More weight loads in flight per lane where a lane holds few accumulators (small batches).
        ["GEMV_UNROLL"] = tuning?.GemvUnroll ?? (bucket <= 4 ? 4 : 1),
        ["MMA_UNROLL"] = tuning?.MmaUnroll ?? 4,
        ["HEAD_DIM"] = c.HeadDim,
        ["GROUPS"] = c.KeyValueGroups,
        ["MAXB"] = bucket,
        ["ROWS"] = RowsPerWarp(bucket),
        ["CHUNK"] = AttentionChunk,
        ["MMA_WARPS"] = MmaWarps,
    };

    private static long CeilDiv(long a, long b) => (a + b - 1) / b;
}

/// <summary>The kernel groups of a fused decode step, for <see cref="FusedDecodeTuning.Skip"/>.</summary>
[Flags]
public enum FusedKernels
{
    None = 0,
    Gemv = 1,
    Attention = 2,
    Norm = 4,
    Rope = 8,
    /// <summary>The token embedding lookup; left out only with everything else ("all").</summary>
    Embedding = 16,
    All = Gemv | Attention | Norm | Rope | Embedding,
}

/// <summary>
/// Diagnostics of the fused decode kernels for tuning and timing runs (VLMTUNE_FUSED_MMA, VLMTUNE_FUSED_GEMV_UNROLL,
/// VLMTUNE_FUSED_MMA_UNROLL, VLMTUNE_FUSED_SKIP through <see cref="RuntimeSwitches"/>); the defaults are what production runs.
/// </summary>
public sealed record FusedDecodeTuning
{
    public static FusedDecodeTuning Default { get; } = new();

    /// <summary>The names VLMTUNE_FUSED_SKIP accepts.</summary>
    public static readonly IReadOnlyDictionary<string, FusedKernels> SkipNames = new Dictionary<string, FusedKernels>
    {
        ["gemv"] = FusedKernels.Gemv, ["attention"] = FusedKernels.Attention, ["norm"] = FusedKernels.Norm,
        ["rope"] = FusedKernels.Rope, ["all"] = FusedKernels.All,
    };

    /// <summary>false: the CUDA-core GEMV for every batch size, never the tensor-core one.</summary>
    public bool TensorCores { get; init; } = true;
    /// <summary>The GEMV kernels' k-loop unrolling (GEMV_UNROLL); null: the plan's.</summary>
    public int? GemvUnroll { get; init; }
    /// <summary>The tensor-core GEMV's k-loop unrolling (MMA_UNROLL); null: the plan's.</summary>
    public int? MmaUnroll { get; init; }
    /// <summary>Kernel groups left out of each step. The results are garbage; the step time then shows what the rest costs.</summary>
    public FusedKernels Skip { get; init; }
    /// <summary>
    /// Repeated steps replay as one CUDA graph (<see cref="KernelGraphCache"/>) instead of ~9 launches per layer
    /// (VLMTUNE_CUDA_GRAPHS=1). Off by default until measured on a GPU: the same kernels with the same arguments run
    /// either way, so the logits are identical (FusedDecoderGraphTests).
    /// </summary>
    public bool Graphs { get; init; }
}

/// <summary>
/// One greedy/sampling decode step of InternLM2, Llama, Qwen2, Qwen3 or Phi-3 (B sequences × 1 new token) as ~9 CUDA kernels per layer launched
/// through the driver API, instead of ~40 TorchSharp ops per layer whose host overhead (60–80 µs each) dominates a
/// decode step. Same numerics as the TorchSharp path: bf16 storage, fp32 accumulation, RMSNorm and softmax in fp32,
/// bf16 rounding wherever the reference rounds. The TorchSharp path stays the reference and the fallback: models on the
/// CPU, in fp32, with unmerged LoRA or NF4 weights, and sequences past the dynamic-NTK threshold are not handled here.
/// The kernels read InternLM2's grouped qkv layout (per KV head: its query heads, its key, its value); for the Llama
/// layout's q/k/v projections (and Qwen2's biases) and Phi-3's stacked qkv_proj (all queries, then all keys, then all
/// values) the rows are packed into that order once, when the decoder is built: a copy of the attention input weights,
/// so weights edited in place afterwards are not seen (adapters are merged at load, before the first decode step).
/// Phi-3's gate_up_proj is read in place as two row ranges (gate, then up). Qwen3's per-head q/k norms run inside the
/// RoPE kernel, and so do Phi-3's longrope factors (short or long by the pass's sequence length) and cos/sin scale.
/// </summary>
public sealed class FusedDecoder
{
    private const string Source = "decode.cu";

    private static readonly ConditionalWeakTable<CausalLanguageModel, Availability> Known = new();

    private sealed record Availability(FusedDecoder? Decoder, string? Reason);

    private readonly CausalLanguageModel _lm;
    private readonly LlmConfig _c;
    private readonly Device _device;
    private readonly Tensor[] _packed;       // the Llama layout's and Phi-3's packed qkv weights and biases, owned here
    private readonly int _ordinal;
    private readonly object _gate = new();
    private readonly Parameter[] _weights;   // the parameters whose pointers are cached, to notice a swap
    private readonly LayerPointers[] _layers;
    private readonly IntPtr _embedding, _finalNorm, _outputHead;
    private readonly Tensor _shortInvFreq, _longInvFreq;   // (d/2) fp32 each, as Rotary.InvFreq computes them (one table unless longrope)
    private readonly IntPtr _shortInvFreqData, _longInvFreqData;
    private readonly float _positionDivisor;
    private readonly float _cosSinScale;    // Phi-3 longrope's attention scaling (1 otherwise)
    private readonly (int Major, int Minor) _arch;
    private Workspace? _workspace;

    /// <summary>One layer's weights as the kernels read them; <c>QkvBias</c> is 0 when the projections have none.</summary>
    private readonly record struct LayerPointers(IntPtr AttentionNorm, IntPtr Wqkv, IntPtr QkvBias, IntPtr QNorm, IntPtr KNorm, IntPtr Wo, IntPtr FfnNorm, IntPtr W1, IntPtr W3, IntPtr W2);

    /// <summary>How a family's attention input projection holds q, k and v.</summary>
    private enum QkvLayout
    {
        /// <summary>InternLM2's wqkv: per KV head its query heads, its key, its value (the kernels' order, read in place).</summary>
        Grouped,
        /// <summary>The Llama layout's q_proj, k_proj, v_proj.</summary>
        Separate,
        /// <summary>Phi-3's qkv_proj: all query heads, then all key heads, then all value heads.</summary>
        Stacked,
    }

    /// <summary>
    /// A decoder layer's parts under one set of names, whatever the family. <c>GateUp</c>: w1 and w3 (gate_proj and
    /// up_proj), or Phi-3's one gate_up_proj whose first intermediate_size rows are the gate and the rest the up projection.
    /// </summary>
    private sealed record LayerParts(int Index, QkvLayout Layout, Parameter AttentionNorm, Linear[] Qkv, Linear Wo, Parameter FfnNorm, Linear[] GateUp, Linear W2)
    {
        /// <summary>Qwen3's per-head query and key RMSNorm weights (head_dim); null for the others.</summary>
        public Parameter? QNorm { get; init; }
        public Parameter? KNorm { get; init; }

        public IEnumerable<Parameter> Norms => new[] { AttentionNorm, FfnNorm }.Concat(QNorm is null ? [] : [QNorm, KNorm!]);

        /// <summary>The linear layers in order: the attention input projection(s), the output projection, the MLP's.</summary>
        public IEnumerable<Linear> Linears => [.. Qkv, Wo, .. GateUp, W2];

        /// <summary><see cref="Linears"/> with their checkpoint names.</summary>
        public IEnumerable<(string Name, Linear L)> Named()
        {
            string[] names = Layout switch
            {
                QkvLayout.Grouped => ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2"],
                QkvLayout.Separate => ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
                _ => ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
            };
            return names.Zip(Linears, (n, l) => ($"layers.{Index}.{n}", l));
        }
    }

    /// <summary>The parts of a family the kernels can run (InternLM2, the Llama layout or Phi-3); null otherwise.</summary>
    private static (Parameter Embedding, Parameter FinalNorm, Linear? Head, LayerParts[] Layers)? Parts(CausalLanguageModel lm) => lm switch
    {
        InternLM2ForCausalLM m => (m.model.tok_embeddings.weight, m.model.norm.weight, m.output, m.model.layers.Select(l => new LayerParts(l.Index, QkvLayout.Grouped,
            l.attention_norm.weight, [l.attention.wqkv], l.attention.wo, l.ffn_norm.weight, [l.feed_forward.w1, l.feed_forward.w3], l.feed_forward.w2)).ToArray()),
        LlamaForCausalLM m => (m.model.embed_tokens.weight, m.model.norm.weight, m.lm_head, m.model.layers.Select(l => new LayerParts(l.Index, QkvLayout.Separate,
            l.input_layernorm.weight, [l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj], l.self_attn.o_proj, l.post_attention_layernorm.weight,
            [l.mlp.gate_proj, l.mlp.up_proj], l.mlp.down_proj) { QNorm = l.self_attn.q_norm?.weight, KNorm = l.self_attn.k_norm?.weight }).ToArray()),
        Phi3ForCausalLM m => (m.model.embed_tokens.weight, m.model.norm.weight, m.lm_head, m.model.layers.Select(l => new LayerParts(l.Index, QkvLayout.Stacked,
            l.input_layernorm.weight, [l.self_attn.qkv_proj], l.self_attn.o_proj, l.post_attention_layernorm.weight,
            [l.mlp.gate_up_proj], l.mlp.down_proj)).ToArray()),
        _ => null,
    };

    /// <summary>
    /// (q, k, v) projection weights (or biases) packed into the kernels' grouped order:
    /// (kvh, groups + 2, head_dim, …), per KV head its query heads, then its key, then its value.
    /// </summary>
    internal static Tensor PackGroupedQkv(Tensor q, Tensor k, Tensor v, LlmConfig c)
    {
        using var scope = NewDisposeScope();
        long kvh = c.NumKeyValueHeads, groups = c.KeyValueGroups, hd = c.HeadDim;
        long[] rest = q.shape[1..];
        Tensor Grouped(Tensor t, long n) => t.view([kvh, n, hd, .. rest]);
        var packed = cat([Grouped(q, groups), Grouped(k, 1), Grouped(v, 1)], 1).reshape([-1, .. rest]).contiguous();   // ((H + 2·kvh)·d, …)
        return packed.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Phi-3's qkv_proj weight (or bias), ((H + 2·kvh)·d, …) with all query heads, then all key heads, then all value
    /// heads, packed into the kernels' grouped order (<see cref="PackGroupedQkv"/>): a new tensor.
    /// </summary>
    internal static Tensor PackStackedQkv(Tensor qkv, LlmConfig c)
    {
        using var scope = NewDisposeScope();
        long q = (long)c.NumAttentionHeads * c.HeadDim, kv = (long)c.NumKeyValueHeads * c.HeadDim;
        return PackGroupedQkv(qkv.narrow(0, 0, q), qkv.narrow(0, q, kv), qkv.narrow(0, q + kv, kv), c).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Pointers to Phi-3's gate and up projections, read in place: rows [0, I) and [I, 2I) of its contiguous gate_up_proj
    /// weight (2·I, D), whose pointers include the rows' offset.
    /// </summary>
    internal static (IntPtr Gate, IntPtr Up) GateUpPointers(Tensor gateUp, long intermediate)
    {
        using var scope = NewDisposeScope();
        return (TensorPointers.DataPointer(gateUp.narrow(0, 0, intermediate)), TensorPointers.DataPointer(gateUp.narrow(0, intermediate, intermediate)));
    }

    /// <summary>
    /// The (d/2) fp32 inv_freq tables a step picks from by its sequence length (<see cref="RotaryEmbedding.UsesLongFactors"/>):
    /// Phi-3 longrope's short and long factors' tables, or one table twice (the same tensor) for every other model. Both
    /// come from <see cref="RotaryEmbedding.InvFreq"/>, so they equal the TorchSharp path's bit for bit. In the caller's
    /// dispose scope.
    /// </summary>
    internal static (Tensor Short, Tensor Long) InvFreqTables(CausalLanguageModel lm, Device device)
    {
        using var scope = NewDisposeScope();
        var rotary = lm.Rotary;
        var c = lm.Config;
        long original = c.OriginalMaxPositionEmbeddings;
        var shortTable = rotary.InvFreq(c.RopeTheta, device, original).contiguous().MoveToOuterDisposeScope();
        var longTable = rotary.UsesLongFactors(original + 1) ? rotary.InvFreq(c.RopeTheta, device, original + 1).contiguous().MoveToOuterDisposeScope() : shortTable;
        return (shortTable, longTable);
    }

    private FusedDecoder(CausalLanguageModel lm)
    {
        _lm = lm;
        _c = lm.Config;
        var (embedding, finalNorm, head, layers) = Parts(lm)!.Value;
        var device = embedding.device;
        _device = device;
        _ordinal = device.index < 0 ? 0 : device.index;
        _weights = Watched(Parts(lm)!.Value).Parameters;
        _embedding = TensorPointers.DataPointer(embedding);
        _finalNorm = TensorPointers.DataPointer(finalNorm);
        _outputHead = TensorPointers.DataPointer(head?.weight ?? embedding);
        var packed = new List<Tensor>();
        IntPtr Pack(Func<Linear, Tensor?> part, LayerParts l)
        {
            if (part(l.Qkv[0]) is not { } first) return 0;
            if (l.Layout == QkvLayout.Grouped) return TensorPointers.DataPointer(first);
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var t = (l.Layout == QkvLayout.Separate ? PackGroupedQkv(first, part(l.Qkv[1])!, part(l.Qkv[2])!, _c) : PackStackedQkv(first, _c))
                .DetachFromDisposeScope();
            packed.Add(t);
            return TensorPointers.DataPointer(t);
        }
        _layers = layers.Select(l =>
        {
            var (w1, w3) = l.GateUp.Length == 2
                ? (TensorPointers.DataPointer(l.GateUp[0].weight), TensorPointers.DataPointer(l.GateUp[1].weight))
                : GateUpPointers(l.GateUp[0].weight, _c.IntermediateSize);
            return new LayerPointers(
                TensorPointers.DataPointer(l.AttentionNorm), Pack(x => x.weight, l), Pack(x => x.bias, l),
                l.QNorm is null ? 0 : TensorPointers.DataPointer(l.QNorm), l.KNorm is null ? 0 : TensorPointers.DataPointer(l.KNorm),
                TensorPointers.DataPointer(l.Wo.weight), TensorPointers.DataPointer(l.FfnNorm), w1, w3, TensorPointers.DataPointer(l.W2.weight));
        }).ToArray();
        _packed = [.. packed];
        (_shortInvFreq, _longInvFreq) = InvFreqTables(lm, device);
        _shortInvFreq.DetachFromDisposeScope();
        if (!ReferenceEquals(_longInvFreq, _shortInvFreq)) _longInvFreq.DetachFromDisposeScope();
        (_shortInvFreqData, _longInvFreqData) = (TensorPointers.DataPointer(_shortInvFreq), TensorPointers.DataPointer(_longInvFreq));
        _positionDivisor = _c.RopeScaling is { Type: "linear", Factor: var f } ? (float)f : 1f;
        // The reference multiplies its fp32 cos/sin by this double, which torch applies as an fp32 scalar.
        _cosSinScale = (float)lm.Rotary.CosSinScale();
        _arch = CudaDriver.Shared.ComputeCapability(_ordinal);
        // Compile the smallest variant now, so a missing or broken NVRTC shows up here and the caller falls back.
        Module(1);
    }

    /// <summary>Why this model cannot use the fused decoder (every reason at once); empty when it can.</summary>
    public static IReadOnlyList<string> Problems(CausalLanguageModel lm)
    {
        var problems = new List<string>();
        var c = lm.Config;
        if (Parts(lm) is not { } parts)
        {
            problems.Add($"{c.Architecture} (the kernels read the InternLM2, Llama and Phi-3 layouts)");
            return problems;
        }
        var weight = parts.Embedding;
        if (weight.device_type != DeviceType.CUDA) problems.Add($"the model is on {weight.device}, not CUDA");
        var linears = parts.Layers.SelectMany(l => l.Named()).ToList();
        if (parts.Head is { } head) linears.Add(("output", head));
        var tensors = linears.Select(x => (Name: x.Name, T: (Tensor)x.L.weight))
            .Append(("embeddings", parts.Embedding)).Append(("norm", parts.FinalNorm))
            .Concat(parts.Layers.SelectMany(l => l.Norms.Select((n, k) => ($"layers.{l.Index}.{new[] { "attention_norm", "ffn_norm", "q_norm", "k_norm" }[k]}", (Tensor)n))));
        var notBf16 = tensors.Where(t => t.Item2.dtype != ScalarType.BFloat16).Select(t => $"{t.Item1} ({t.Item2.dtype})").ToList();
        if (notBf16.Count > 0) problems.Add($"weights are not bfloat16: {Summary(notBf16)}");
        var notContiguous = tensors.Where(t => !t.Item2.is_contiguous()).Select(t => t.Item1).ToList();
        if (notContiguous.Count > 0) problems.Add($"weights are not contiguous: {Summary(notContiguous)}");
        var lora = linears.Where(x => x.L.HasLora).Select(x => x.Name).ToList();
        if (lora.Count > 0) problems.Add($"unmerged LoRA on {Summary(lora)} (merge the adapter to decode fused)");
        var custom = linears.Where(x => x.L.WeightProvider is not null || x.L.BaseForward is not null).Select(x => x.Name).ToList();
        if (custom.Count > 0) problems.Add($"quantised or custom weights (e.g. NF4) on {Summary(custom)}");
        // Biases only where the kernels add them: the q/k/v projections of the Llama layout (Qwen2) and Phi-3's qkv_proj.
        var qkvWithBias = parts.Layers.SelectMany(l => l.Layout == QkvLayout.Grouped ? [] : l.Qkv).ToHashSet();
        if (linears.Any(x => x.L.bias is not null && !qkvWithBias.Contains(x.L))) problems.Add("linear layers with bias (other than q/k/v)");
        if (c.HiddenAct != "silu") problems.Add($"hidden_act {c.HiddenAct} (silu only)");
        if (c.HiddenSize % 8 != 0 || c.IntermediateSize % 8 != 0)
            problems.Add($"hidden_size {c.HiddenSize} and intermediate_size {c.IntermediateSize} must be multiples of 8 (16-byte loads)");
        int hd = c.HeadDim;
        if (hd % 8 != 0 || hd > 256 || (c.KeyValueGroups + 2) * hd / 2 > 1024)
            problems.Add($"head_dim {hd} with {c.KeyValueGroups} query heads per KV head (needs head_dim a multiple of 8 up to 256, (groups + 2)·head_dim ≤ 2048)");
        if (c.NumAttentionHeads % c.NumKeyValueHeads != 0) problems.Add("num_attention_heads not a multiple of num_key_value_heads");
        else if (c.KeyValueGroups > 8) problems.Add($"{c.KeyValueGroups} query heads per KV head (the attention kernel's shared memory holds at most 8)");
        if (c.RopeScaling is { Type: not ("linear" or "dynamic" or "longrope") } rs) problems.Add($"rope_scaling type {rs.Type}");
        return problems;
    }

    private static string Summary(List<string> names) => names.Count <= 3 ? string.Join(", ", names) : $"{string.Join(", ", names.Take(3))} and {names.Count - 3} more";

    /// <summary>
    /// The model's fused decoder (built and compiled once per model), or null with the reason: turned off
    /// (<paramref name="enabled"/> false: <see cref="RuntimeSwitches.FusedDecode"/>), a model it does not handle, or
    /// CUDA libraries that are absent or fail. A model that changes later (LoRA attached, weights replaced) is caught
    /// by <see cref="CanStep"/>.
    /// </summary>
    public static FusedDecoder? TryGet(CausalLanguageModel model, bool enabled, out string? reason)
    {
        if (!enabled) { reason = $"{RuntimeSwitches.FusedDecodeVariable}=0"; return null; }
        var problems = Problems(model);
        if (problems.Count > 0) { reason = "not supported: " + string.Join("; ", problems); return null; }
        var known = Known.GetValue(model, lm =>
        {
            try { return new Availability(new FusedDecoder(lm), null); }
            catch (CudaException e) { return new Availability(null, e.Message); }
        });
        reason = known.Reason;
        return known.Decoder;
    }

    /// <summary>
    /// Whether the next step over <paramref name="cache"/> can run fused: the model is unchanged since this decoder was
    /// built, the cache is bf16 on CUDA, and the RoPE base is the configured one (a dynamic-NTK base change needs the TorchSharp path's re-rotation).
    /// </summary>
    public bool CanStep(KvCache cache)
    {
        if (!WeightsUnchanged()) return false;
        var keys = cache.KeysOf(0);   // the kernels write bf16 keys/values in place
        if (keys.dtype != ScalarType.BFloat16 || keys.device_type != DeviceType.CUDA || keys.shape[3] != _c.HeadDim) return false;
        double theta = _lm.Rotary.Theta(cache.Length + 1);
        if (theta != _c.RopeTheta) return false;
        return double.IsNaN(cache.Theta) || cache.Theta == theta;
    }

    private bool WeightsUnchanged()
    {
        if (Parts(_lm) is not { } parts) return false;
        var (linears, now) = Watched(parts);
        if (now.Length != _weights.Length || now.Where((p, i) => !ReferenceEquals(p, _weights[i])).Any()) return false;
        return linears.All(l => !l.HasLora && l.WeightProvider is null && l.BaseForward is null);
    }

    /// <summary>
    /// The linear layers a step reads (a tied head is the embedding: no module of its own) and every parameter whose
    /// pointer the decoder caches, in one order: the constructor records them, each step compares.
    /// </summary>
    private static (Linear[] Linears, Parameter[] Parameters) Watched((Parameter Embedding, Parameter FinalNorm, Linear? Head, LayerParts[] Layers) parts)
    {
        Linear[] linears = [.. parts.Layers.SelectMany(l => l.Linears), .. parts.Head is null ? [] : new[] { parts.Head }];
        Parameter[] parameters = [parts.Embedding, parts.FinalNorm, .. parts.Layers.SelectMany(l => l.Norms),
            .. linears.SelectMany(l => l.bias is null ? new[] { l.weight } : [l.weight, l.bias])];
        return (linears, parameters);
    }

    /// <summary>
    /// Runs one decode step: embeds <paramref name="ids"/> (B, 1) int64, appends every layer's key/value at column
    /// cache.Length, and returns the logits (B, V) in the model dtype. <paramref name="positions"/> (B, 1) int64 gives
    /// each row's RoPE position (null: cache.Length for every row); <paramref name="firstColumn"/> (B) int32 each row's
    /// first valid cache column (null: 0), for right-aligned batches whose shorter rows are left-padded.
    /// <paramref name="tuning"/>: the diagnostics switches (null: the defaults). Check <see cref="CanStep"/> first.
    /// </summary>
    public Tensor Step(Tensor ids, KvCache cache, Tensor? positions = null, Tensor? firstColumn = null, FusedDecodeTuning? tuning = null)
    {
        tuning ??= FusedDecodeTuning.Default;
        int batch = (int)ids.shape[0];
        if (ids.numel() != batch || ids.dtype != ScalarType.Int64 || ids.device_type != DeviceType.CUDA)
            throw new ArgumentException($"ids must be (B, 1) int64 on CUDA, got ({string.Join(", ", ids.shape)}) {ids.dtype} on {ids.device}", nameof(ids));
        if (cache.Batch != batch) throw new ArgumentException($"the cache holds {cache.Batch} rows, ids {batch}", nameof(cache));
        if (positions is not null && (positions.numel() != batch || positions.dtype != ScalarType.Int64 || !positions.is_contiguous()))
            throw new ArgumentException($"positions must be (B, 1) contiguous int64, got ({string.Join(", ", positions.shape)}) {positions.dtype}", nameof(positions));
        if (firstColumn is not null && (firstColumn.numel() != batch || firstColumn.dtype != ScalarType.Int32 || !firstColumn.is_contiguous()))
            throw new ArgumentException($"firstColumn must be (B) contiguous int32, got ({string.Join(", ", firstColumn.shape)}) {firstColumn.dtype}", nameof(firstColumn));
        ids = ids.is_contiguous() ? ids : ids.contiguous();

        lock (_gate)
        {
            var driver = CudaDriver.Shared;
            driver.UsePrimaryContext(_ordinal);
            cache.Reserve(1);
            long col = cache.Length, total = col + 1, capacity = cache.Capacity;
            int splits = FusedDecodePlan.AttentionSplits(total);
            var ws = WorkspaceFor(batch, splits);
            var module = Module(FusedDecodePlan.BatchBucket(batch), tuning);

            // The step's inputs go into the workspace's slots, and the column and key count into its step buffer, so
            // that the launches below are the same from step to step (a graph of them can be replayed): only a new
            // batch shape, split count, cache storage or RoPE table changes them.
            CopyInto(ws.Ids, ids);
            if (positions is not null) CopyInto(ws.Positions, positions);
            if (firstColumn is not null) CopyInto(ws.First, firstColumn);
            driver.Launch(module.Function("set_step"), (1, 1, 1), 1, 0, [ws.StepData, col, total]);

            long d = _c.HiddenSize, hd = _c.HeadDim, kvh = _c.NumKeyValueHeads, heads = _c.NumAttentionHeads, inter = _c.IntermediateSize;
            long qkvWidth = (heads + 2 * kvh) * hd;
            float eps = (float)_c.RmsNormEps, scale = (float)(1.0 / Math.Sqrt(hd));
            IntPtr x = ws.X, xn = ws.Xn;
            long pos = positions is null ? 0 : ws.PositionsData;
            long first = firstColumn is null ? 0 : ws.FirstData;
            long cachePositions = TensorPointers.DataPointer(cache.PositionsTensor);
            // Phi-3 longrope picks its factors by the pass's sequence length (past + 1 for every row, as RunLayers); keys
            // cached under the short factors are not re-rotated, as in the TorchSharp path.
            IntPtr invFreq = _lm.Rotary.UsesLongFactors(total) ? _longInvFreqData : _shortInvFreqData;

            bool mma = FusedDecodePlan.UseTensorCores(batch, _arch, _c, tuning);
            IntPtr embed = module.Function("embed_rows"), norm = module.Function("rms_norm"),
                plain = module.Function(mma ? "mma_plain" : "gemv_plain"), biased = module.Function(mma ? "mma_bias" : "gemv_bias"),
                residual = module.Function(mma ? "mma_residual" : "gemv_residual"),
                gated = module.Function(mma ? "mma_gated" : "gemv_gated"), rope = module.Function("rope_append"),
                split = module.Function("attention_split"), combine = module.Function("attention_combine");
            uint rows = (uint)batch;
            uint gemvBlock = (uint)(mma ? FusedDecodePlan.MmaWarps * 32 : FusedDecodePlan.GemvBlock);
            (uint, uint, uint) Grid(long n) => mma ? FusedDecodePlan.MmaGrid(n, batch) : FusedDecodePlan.GemvGrid(n, batch);
            var qkvGrid = Grid(qkvWidth);
            var hiddenGrid = Grid(d);
            var gatedGrid = mma ? FusedDecodePlan.MmaGrid(inter, batch) : FusedDecodePlan.GatedGrid(inter, batch);
            uint ropeThreads = (uint)((_c.KeyValueGroups + 2) * hd / 2);
            var skip = tuning.Skip;
            bool skipGemv = skip.HasFlag(FusedKernels.Gemv), skipAttention = skip.HasFlag(FusedKernels.Attention),
                skipNorm = skip.HasFlag(FusedKernels.Norm), skipRope = skip.HasFlag(FusedKernels.Rope);

            var step = new LaunchSequence();
            if (!skip.HasFlag(FusedKernels.Embedding)) step.Add(embed, (rows, 1, 1), 256, 0, ws.IdsData, _embedding, x, d);
            for (int i = 0; i < _layers.Length; i++)
            {
                var w = _layers[i];
                long keys = TensorPointers.DataPointer(cache.KeysOf(i)), values = TensorPointers.DataPointer(cache.ValuesOf(i));
                if (!skipNorm) step.Add(norm, (rows, 1, 1), 256, 0, x, w.AttentionNorm, xn, d, CudaDriver.Arg(eps));
                if (!skipGemv)
                {
                    if (w.QkvBias == 0) step.Add(plain, qkvGrid, gemvBlock, 0, xn, w.Wqkv, ws.Qkv, batch, qkvWidth, d);
                    else step.Add(biased, qkvGrid, gemvBlock, 0, xn, w.Wqkv, w.QkvBias, ws.Qkv, batch, qkvWidth, d);
                }
                if (!skipRope)
                    step.Add(rope, (rows, (uint)kvh, 1), ropeThreads, 0,
                        ws.Qkv, ws.Q, keys, values, pos, i == 0 ? cachePositions : 0, invFreq, CudaDriver.Arg(_positionDivisor), CudaDriver.Arg(_cosSinScale),
                        ws.StepData, capacity, w.QNorm, w.KNorm, CudaDriver.Arg(eps));
                if (!skipAttention)
                {
                    step.Add(split, ((uint)splits, (uint)kvh, rows), FusedDecodePlan.AttentionChunk, 0,
                        ws.Q, keys, values, first, ws.PartO, ws.PartMl, ws.StepData, capacity, CudaDriver.Arg(scale));
                    step.Add(combine, ((uint)heads, rows, 1), (uint)hd, 0, ws.PartO, ws.PartMl, ws.Attn, splits);
                }
                if (!skipGemv) step.Add(residual, hiddenGrid, gemvBlock, 0, ws.Attn, w.Wo, x, x, batch, d, heads * hd);
                if (!skipNorm) step.Add(norm, (rows, 1, 1), 256, 0, x, w.FfnNorm, xn, d, CudaDriver.Arg(eps));
                if (!skipGemv) step.Add(gated, gatedGrid, gemvBlock, 0, xn, w.W1, w.W3, ws.Act, batch, inter, d);
                if (!skipGemv) step.Add(residual, hiddenGrid, gemvBlock, 0, ws.Act, w.W2, x, x, batch, d, inter);
            }
            if (!skipNorm) step.Add(norm, (rows, 1, 1), 256, 0, x, _finalNorm, xn, d, CudaDriver.Arg(eps));
            if (!skipGemv) step.Add(plain, Grid(_c.VocabSize), gemvBlock, 0, xn, _outputHead, ws.LogitsData, batch, _c.VocabSize, d);

            _launcher ??= new CudaGraphExecutor(driver);
            if (tuning.Graphs && driver.SupportsGraphs) LastRun = (_graphs ??= new KernelGraphCache(_launcher)).Run(step);
            else
            {
                _launcher.Launch(step);
                LastRun = GraphRun.Direct;
            }
            cache.AdvanceWritten(1, _c.RopeTheta);
            // A copy: the workspace's logits are overwritten by the next step, which a caller may run before reading these.
            return ws.Logits.clone();
        }
    }

    private CudaGraphExecutor? _launcher;   // the steps' launches, direct or through _graphs
    private KernelGraphCache? _graphs;

    /// <summary>Copies <paramref name="source"/>'s B values into the workspace slot <paramref name="slot"/> (B), disposing the handles it makes.</summary>
    private static void CopyInto(Tensor slot, Tensor source)
    {
        using var flat = source.view(slot.shape[0]);
        using var copied = slot.copy_(flat);
    }

    /// <summary>How the last step ran (diagnostics and tests).</summary>
    public GraphRun LastRun { get; private set; }

    /// <summary>Steps captured into a CUDA graph, replayed from one, and launched directly, with <see cref="FusedDecodeTuning.Graphs"/> on.</summary>
    public (long Captures, long Replays, long Direct) GraphCounts => _graphs is { } g ? (g.Captures, g.Replays, g.DirectRuns) : (0, 0, 0);

    /// <summary>Why steps stopped being captured (the driver refused a capture); null while graphs work or are off.</summary>
    public string? GraphsDisabledReason => _graphs?.DisabledReason;

    /// <summary>Greedy ids (B, 1) int64 of logits (B, V) in the model dtype: the first maximum on ties, as argmax.</summary>
    public Tensor Greedy(Tensor logits)
    {
        if (logits.dim() != 2 || logits.dtype != ScalarType.BFloat16 || !logits.is_contiguous())
            throw new ArgumentException("logits must be (B, V) contiguous bfloat16", nameof(logits));
        int batch = (int)logits.shape[0];
        var ids = empty(new long[] { batch, 1 }, ScalarType.Int64, logits.device);
        lock (_gate)
        {
            var driver = CudaDriver.Shared;
            driver.UsePrimaryContext(_ordinal);
            var module = Module(1);
            driver.Launch(module.Function("argmax_rows"), ((uint)batch, 1, 1), 1024, 0,
                [TensorPointers.DataPointer(logits), TensorPointers.DataPointer(ids), logits.shape[1]]);
        }
        return ids;
    }

    private KernelModule Module(int bucket, FusedDecodeTuning? tuning = null) =>
        KernelModule.Get(Source, _ordinal, FusedDecodePlan.Defines(_c, bucket, tuning));

    /// <summary>Activations of one step, kept between steps (reallocated when the batch or the split count grows).</summary>
    private Workspace WorkspaceFor(int batch, int splits)
    {
        if (_workspace is { } w && w.Batch == batch && w.Splits >= splits) return w;
        _workspace?.Dispose();
        // Room for more splits than needed now, so a growing sequence rarely reallocates.
        _workspace = new Workspace(_c, batch, Math.Max(splits * 2, 16), _device);
        return _workspace;
    }

    private sealed class Workspace : IDisposable
    {
        private readonly Tensor[] _tensors;
        public int Batch { get; }
        public int Splits { get; }
        public IntPtr X, Xn, Qkv, Q, Attn, Act, PartO, PartMl;
        /// <summary>The step's inputs and output, at fixed addresses: ids (B), positions (B), first columns (B), logits (B, V).</summary>
        public Tensor Ids, Positions, First, Logits;
        public long IdsData, PositionsData, FirstData, LogitsData;
        /// <summary>(col, total) of the step, int32, written by set_step.</summary>
        public long StepData;

        public Workspace(LlmConfig c, int batch, int splits, Device device)
        {
            Batch = batch; Splits = splits;
            long hd = c.HeadDim, heads = c.NumAttentionHeads;
            Tensor Of(ScalarType type, params long[] shape) => empty(shape, type, device).DetachFromDisposeScope();
            _tensors =
            [
                Of(ScalarType.BFloat16, batch, c.HiddenSize), Of(ScalarType.BFloat16, batch, c.HiddenSize), Of(ScalarType.BFloat16, batch, (heads + 2 * c.NumKeyValueHeads) * hd),
                Of(ScalarType.BFloat16, batch, heads, hd), Of(ScalarType.BFloat16, batch, heads * hd), Of(ScalarType.BFloat16, batch, c.IntermediateSize),
                Of(ScalarType.Float32, batch, heads, splits, hd), Of(ScalarType.Float32, batch, heads, splits, 2),
                Of(ScalarType.Int64, batch), Of(ScalarType.Int64, batch), Of(ScalarType.Int32, batch), Of(ScalarType.BFloat16, batch, c.VocabSize),
                Of(ScalarType.Int32, 2),
            ];
            var p = _tensors.Select(TensorPointers.DataPointer).ToArray();
            (X, Xn, Qkv, Q, Attn, Act, PartO, PartMl) = (p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
            (Ids, Positions, First, Logits) = (_tensors[8], _tensors[9], _tensors[10], _tensors[11]);
            (IdsData, PositionsData, FirstData, LogitsData, StepData) = (p[8], p[9], p[10], p[11], p[12]);
        }

        public void Dispose() { foreach (var t in _tensors) t.Dispose(); }
    }
}
