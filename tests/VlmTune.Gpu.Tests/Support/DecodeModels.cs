using TorchSharp;
using VlmTune.Checkpoints;
using VlmTune.Models;
using VlmTune.Tests.Support;
using static TorchSharp.torch;

namespace VlmTune.Gpu.Tests.Support;

/// <summary>
/// The language models the decoder tests run, by name, each loaded once per process in bfloat16 on
/// <paramref name="device"/>. Two kinds: the tiny checkpoints (the shared InternLM2 fixture and the committed family
/// fixtures, as released code writes them) and random models with shape-true heads (head_dim 128, the query-group
/// sizes of the released families; Phi-3-mini's head_dim 96), because the fixtures' heads are 8–16 wide and their
/// hidden sizes (16, 48) keep the Llama-layout fixtures off the tensor-core GEMV.
/// </summary>
public static class DecodeModels
{
    /// <summary>Checkpoints: InternLM2 (tiny-internvl2), Qwen2 (q/k/v biases), Qwen3 (q/k norms, tied head), Llama (3 and 6 query heads per KV head).</summary>
    public static readonly string[] Checkpoints = ["internlm2", "qwen2", "qwen3", "llama", "llama_g6"];

    /// <summary>Random weights, head_dim 128: the released families' query groups (2, 6, 2) and the kernels' largest (8).</summary>
    public static readonly string[] ShapeTrue = ["internlm2-d128", "qwen2-d128", "qwen3-d128", "llama-d128"];

    /// <summary>
    /// Random Phi-3 models (stacked qkv_proj, gate_up_proj, longrope) with Phi-3-mini's head_dim 96, whose 12 16-byte
    /// slices are not a power of two: one query head per KV head as released, and 4 (GQA, Phi-3-medium's grouping).
    /// 16 heads rather than Phi-3-mini's 32, so that the hidden size (1536) keeps their random attention as soft as the
    /// other shape-true models': at 3072 the scores are twice as large, and exact attention against SDPA (the noise
    /// the tolerance is set from, ToleranceSensitivityTests) already moves the centred cosine by 2e-4. Their own test
    /// class (Phi3FusedDecoderTests), so they can be run alone.
    /// </summary>
    public static readonly string[] Phi3 = ["phi3-d96", "phi3-d96-g4"];

    /// <summary>The models whose shapes take the tensor-core GEMV from batch 8 (hidden, intermediate and q widths multiples of 32).</summary>
    public static readonly string[] TensorCoreCapable = ["internlm2", .. ShapeTrue, .. Phi3];

    private static readonly Dictionary<string, CausalLanguageModel> Loaded = [];
    private static readonly List<IDisposable> Owners = [];

    public static CausalLanguageModel Get(string name, Device device)
    {
        lock (Loaded)
        {
            string key = $"{name}@{device}";
            if (!Loaded.TryGetValue(key, out var lm)) Loaded[key] = lm = Load(name, device);
            return lm;
        }
    }

    private static CausalLanguageModel Load(string name, Device device) => name switch
    {
        "internlm2" => Checkpoint(Fixtures.TinyModel, device),
        "qwen2" or "qwen3" or "llama" or "llama_g6" => Checkpoint(FamilyFixtures.ModelDir(name), device),
        _ => Random(name, device),
    };

    private static CausalLanguageModel Checkpoint(string dir, Device device)
    {
        var model = InternVLModelLoader.Load(dir, new ModelOptions { Device = device, DType = ScalarType.BFloat16 });
        Owners.Add(model);
        return model.language_model;
    }

    public static LlmConfig ShapeTrueConfig(string name) => name switch
    {
        // InternLM2-1.8B's heads (InternVL2-2B): 2 query heads per KV head.
        "internlm2-d128" => new LlmConfig
        {
            Architecture = LlmArchitectures.InternLM2, HiddenSize = 1024, NumHiddenLayers = 2, NumAttentionHeads = 8, NumKeyValueHeads = 4,
            IntermediateSize = 2816, VocabSize = OddVocabulary, RopeTheta = 1_000_000, MaxPositionEmbeddings = 4096,
        },
        // Qwen2.5-1.5B's (InternVL3-2B): 6 query heads per KV head, q/k/v biases.
        "qwen2-d128" => new LlmConfig
        {
            Architecture = LlmArchitectures.Qwen2, HiddenSize = 1536, NumHiddenLayers = 2, NumAttentionHeads = 12, NumKeyValueHeads = 2,
            IntermediateSize = 2048, VocabSize = OddVocabulary, RopeTheta = 1_000_000, MaxPositionEmbeddings = 4096, QkvBias = true,
        },
        // Qwen3-1.7B's (InternVL3.5-2B): head_dim 128 apart from hidden / heads, q/k norms, tied embeddings.
        "qwen3-d128" => new LlmConfig
        {
            Architecture = LlmArchitectures.Qwen3, HiddenSize = 1024, NumHiddenLayers = 2, NumAttentionHeads = 16, NumKeyValueHeads = 8, HeadDim = 128,
            IntermediateSize = 3072, VocabSize = OddVocabulary, RopeTheta = 1_000_000, MaxPositionEmbeddings = 4096, QkNorm = true, TieWordEmbeddings = true,
        },
        // 8 query heads per KV head: the most the attention kernel's shared memory holds.
        "llama-d128" => new LlmConfig
        {
            Architecture = LlmArchitectures.Llama, HiddenSize = 1024, NumHiddenLayers = 2, NumAttentionHeads = 8, NumKeyValueHeads = 1,
            IntermediateSize = 2816, VocabSize = OddVocabulary, RopeTheta = 500_000, MaxPositionEmbeddings = 4096,
        },
        // Phi-3-mini-128k's heads (InternVL2-4B): 96 wide, one per KV head, longrope over its 4096-token original
        // context (cos/sin scale √(1 + ln 32 / ln 4096) ≈ 1.19): the tests' prompts take the short factors.
        "phi3-d96" => new LlmConfig
        {
            Architecture = LlmArchitectures.Phi3, HiddenSize = 1536, NumHiddenLayers = 2, NumAttentionHeads = 16, NumKeyValueHeads = 16,
            IntermediateSize = 2048, VocabSize = OddVocabulary, RmsNormEps = 1e-5, RopeTheta = 10_000,
            MaxPositionEmbeddings = 131_072, OriginalMaxPositionEmbeddings = 4096, RopeScaling = LongRope(96),
        },
        // GQA, 4 query heads per KV head, and a 64-token original context (scale √(1 + ln 8 / ln 64) = √1.5): a 250-token
        // prompt runs on the long factors, Phi3FusedDecoderTests' 60-token one crosses to them while decoding.
        "phi3-d96-g4" => new LlmConfig
        {
            Architecture = LlmArchitectures.Phi3, HiddenSize = 1536, NumHiddenLayers = 2, NumAttentionHeads = 16, NumKeyValueHeads = 4,
            IntermediateSize = 2048, VocabSize = OddVocabulary, RmsNormEps = 1e-5, RopeTheta = 10_000,
            MaxPositionEmbeddings = 512, OriginalMaxPositionEmbeddings = 64, RopeScaling = LongRope(96),
        },
        _ => throw new ArgumentException($"no decode test model '{name}'", nameof(name)),
    };

    /// <summary>
    /// Longrope factors for <paramref name="headDim"/>, as Phi-3's rise with the wavelength: short ones near 1, long
    /// ones from 1.5 to ~30, different at every frequency, so a step on the wrong table moves every rotated pair.
    /// </summary>
    private static RopeScaling LongRope(int headDim)
    {
        int half = headDim / 2;
        return new RopeScaling("longrope", 1)
        {
            ShortFactor = [.. Enumerable.Range(0, half).Select(i => 1 + 0.25 * i / half)],
            LongFactor = [.. Enumerable.Range(0, half).Select(i => 1.5 + 30.0 * i * i / (half * half))],
        };
    }

    /// <summary>Odd and not a multiple of 16: the output head's GEMV grids end in a partial tile.</summary>
    private const int OddVocabulary = 4099;

    /// <summary>
    /// A new shape-true model with its fixed random weights (drawn on the CPU, so every device and every call gets the
    /// same values); the caller owns it. Sensitivity tests build variants of it (another attention kernel, a planted bug);
    /// <paramref name="edit"/> changes its config without changing its shapes (the same weights: e.g. RoPE settings).
    /// </summary>
    public static CausalLanguageModel NewShapeTrue(string name, Device device, AttentionKind attention = AttentionKind.Sdpa, Func<LlmConfig, LlmConfig>? edit = null)
    {
        var shape = ShapeTrueConfig(name);
        var c = edit is null ? shape : edit(shape);
        var lm = CausalLanguageModel.Create(c, new ModelOptions { Device = device, DType = ScalarType.BFloat16, Attention = attention });
        using (no_grad())
        {
            var generator = new Generator((ulong)(shape.HiddenSize + shape.NumAttentionHeads));
            foreach (var (key, p) in lm.named_parameters())
            {
                using var values = empty(p.shape, ScalarType.Float32);
                // Norm weights and biases away from 1 and 0 (RandomInit's values): a kernel that skipped them would agree.
                if (key.Contains("norm")) values.normal_(1, 0.2, generator);
                else if (key.EndsWith(".bias", StringComparison.Ordinal)) values.normal_(0, 0.2, generator);
                else values.normal_(0, 0.02, generator);
                p.copy_(values);
            }
        }
        lm.eval();
        return lm;
    }

    private static CausalLanguageModel Random(string name, Device device)
    {
        var lm = NewShapeTrue(name, device);
        Owners.Add(lm);
        return lm;
    }
}
