using TorchSharp;
using VlmTune.Inference;
using VlmTune.Models;
using VlmTune.Tests.Cuda;
using static TorchSharp.torch;

namespace VlmTune.Tests.Inference;

public class FusedDecoderTests
{
    private static InternLM2ForCausalLM Model(ScalarType dtype)
    {
        var lm = new InternLM2ForCausalLM(CudaLibraryTests.TinyConfig(), new ModelOptions { DType = dtype });
        foreach (var p in lm.parameters()) { using var g = no_grad(); p.normal_(0, 0.02); }
        return lm;
    }

    [Fact]
    public void CpuFp32ModelIsNotSupportedAndSaysWhy()
    {
        using var lm = Model(ScalarType.Float32);
        var problems = FusedDecoder.Problems(lm);
        Assert.Contains(problems, p => p.Contains("not CUDA"));
        Assert.Contains(problems, p => p.Contains("not bfloat16") && p.Contains("Float32"));
        Assert.Null(FusedDecoder.TryGet(lm, enabled: true, out var reason));
        Assert.StartsWith("not supported", reason);
    }

    [Fact]
    public void Bf16ModelOnCpuFailsOnlyOnTheDevice()
    {
        using var lm = Model(ScalarType.BFloat16);
        var problem = Assert.Single(FusedDecoder.Problems(lm));
        Assert.Contains("not CUDA", problem);
    }

    [Fact]
    public void UnmergedLoraAndQuantisedWeightsAreNotSupported()
    {
        using var lm = Model(ScalarType.BFloat16);
        lm.model.layers[1].attention.wqkv.AddLora(4, 8, 0, ScalarType.BFloat16);
        lm.model.layers[0].feed_forward.w2.WeightProvider = () => lm.model.layers[0].feed_forward.w2.weight;
        var problems = FusedDecoder.Problems(lm);
        Assert.Contains(problems, p => p.Contains("unmerged LoRA") && p.Contains("layers.1.attention.wqkv"));
        Assert.Contains(problems, p => p.Contains("quantised") && p.Contains("layers.0.feed_forward.w2"));
    }

    [Fact]
    public void UnsupportedHeadShapesAreReported()
    {
        var c = CudaLibraryTests.TinyConfig() with { HiddenSize = 60, NumAttentionHeads = 4, NumKeyValueHeads = 2 };   // head_dim 15
        using var lm = new InternLM2ForCausalLM(c, new ModelOptions { DType = ScalarType.BFloat16 });
        var problems = FusedDecoder.Problems(lm);
        Assert.Contains(problems, p => p.Contains("head_dim 15"));
        Assert.Contains(problems, p => p.Contains("multiples of 8"));
    }

    [Fact]
    public void WideQueryGroupsAreReported()
    {
        var c = CudaLibraryTests.TinyConfig() with { HiddenSize = 256, NumAttentionHeads = 16, NumKeyValueHeads = 1 };   // 16 query heads per KV head
        using var lm = new InternLM2ForCausalLM(c, new ModelOptions { DType = ScalarType.BFloat16 });
        Assert.Contains(FusedDecoder.Problems(lm), p => p.Contains("16 query heads per KV head"));
    }

    [Fact]
    public void SwitchedOffBeforeAnyModelCheck()
    {
        using var lm = Model(ScalarType.Float32);
        Assert.Null(FusedDecoder.TryGet(lm, enabled: false, out var reason));
        Assert.Equal($"{RuntimeSwitches.FusedDecodeVariable}=0", reason);
    }

    [Fact]
    public void EngineOptionDefaultsOn()
    {
        Assert.True(new EngineOptions().FusedDecode);
        Assert.False((new EngineOptions() with { FusedDecode = false }).FusedDecode);
    }

    [Theory]
    [InlineData(1, 1)]
    [InlineData(2, 2)]
    [InlineData(3, 4)]
    [InlineData(8, 8)]
    [InlineData(9, 16)]
    [InlineData(32, 32)]
    [InlineData(40, 32)]
    public void BatchBuckets(int batch, int bucket) => Assert.Equal(bucket, FusedDecodePlan.BatchBucket(batch));

    [Fact]
    public void GemvGridsCoverEveryRowAndBatchRow()
    {
        // Batch 1: 4 rows per warp, 8 warps per block → 32 rows per block.
        Assert.Equal(4, FusedDecodePlan.RowsPerWarp(1));
        Assert.Equal((128u, 1u, 1u), FusedDecodePlan.GemvGrid(4096, 1));
        // Batch 40: bucket 32 (1 row per warp), two bucket rows of the grid; the odd vocab rounds up.
        Assert.Equal(1, FusedDecodePlan.RowsPerWarp(32));
        Assert.Equal((11570u, 2u, 1u), FusedDecodePlan.GemvGrid(92553, 40));
        Assert.Equal((1024u, 1u, 1u), FusedDecodePlan.GatedGrid(8192, 4));
        Assert.Equal((5785u, 1u, 1u), FusedDecodePlan.MmaGrid(92553, 32));
        Assert.Equal((128u, 2u, 1u), FusedDecodePlan.MmaGrid(2048, 33));
        Assert.Throws<ArgumentOutOfRangeException>(() => FusedDecodePlan.BatchBucket(0));
    }

    [Fact]
    public void TensorCoresFromBatch8OnAmpereAndLater()
    {
        var c = CudaLibraryTests.TinyConfig();
        Assert.False(FusedDecodePlan.UseTensorCores(4, (9, 0), c));
        Assert.True(FusedDecodePlan.UseTensorCores(5, (9, 0), c));    // bucket 8
        Assert.True(FusedDecodePlan.UseTensorCores(32, (8, 0), c));
        Assert.False(FusedDecodePlan.UseTensorCores(32, (7, 5), c));  // no bf16 mma before sm_80
        Assert.False(FusedDecodePlan.UseTensorCores(32, (9, 0), c with { IntermediateSize = 168 }));   // K not a multiple of 32
    }

    /// <summary>VLMTUNE_FUSED_MMA and the unroll switches, passed in, change the plan the kernels are launched and compiled with.</summary>
    [Fact]
    public void TuningSwitchesChangeThePlan()
    {
        var c = CudaLibraryTests.TinyConfig();
        var tuning = RuntimeSwitches.FromEnvironment(new System.Collections.Hashtable
        {
            [RuntimeSwitches.FusedMmaVariable] = "0", [RuntimeSwitches.FusedGemvUnrollVariable] = "2", [RuntimeSwitches.FusedMmaUnrollVariable] = "8",
        }).FusedTuning;
        Assert.False(FusedDecodePlan.UseTensorCores(32, (9, 0), c, tuning));
        Assert.True(FusedDecodePlan.UseTensorCores(32, (9, 0), c, FusedDecodeTuning.Default));
        var defines = FusedDecodePlan.Defines(c, 1, tuning);
        Assert.Equal((2, 8), (defines["GEMV_UNROLL"], defines["MMA_UNROLL"]));
        var plain = FusedDecodePlan.Defines(c, 1);
        Assert.Equal((4, 4), (plain["GEMV_UNROLL"], plain["MMA_UNROLL"]));
    }

    [Theory]
    [InlineData(1, 1)]
    [InlineData(128, 1)]
    [InlineData(129, 2)]
    [InlineData(3401, 27)]
    public void AttentionSplitsOf128Keys(long keys, int splits) => Assert.Equal(splits, FusedDecodePlan.AttentionSplits(keys));
}

/// <summary>
/// The Llama layout on the fused path: its q/k/v projections (and Qwen2's biases) packed into the kernels' grouped
/// order must compute what the InternLM2 attention computes with that packed wqkv, which is what the kernels implement.
/// </summary>
public class FusedDecoderLlamaLayoutTests
{
    [Theory]
    [InlineData(6, 2, true)]    // 3 query heads per KV head, Qwen2's q/k/v biases
    [InlineData(8, 1, false)]   // 8 per KV head, Llama without biases
    public void PackedQkvGivesTheLlamaAttentionThroughTheInternLM2Layout(int heads, int kvHeads, bool bias)
    {
        using var scope = NewDisposeScope();
        var c = new LlmConfig
        {
            Architecture = bias ? LlmArchitectures.Qwen2 : LlmArchitectures.Llama, HiddenSize = 48, NumHiddenLayers = 1,
            NumAttentionHeads = heads, NumKeyValueHeads = kvHeads, IntermediateSize = 32, VocabSize = 64, HeadDim = 8, QkvBias = bias,
        };
        var o = new ModelOptions { Attention = AttentionKind.Exact };
        using var llama = new LlamaAttention(c, o, 0);
        using var intern = new InternLM2Attention(c with { Architecture = LlmArchitectures.InternLM2, QkvBias = false, Bias = bias }, o, 0);
        using (no_grad())
        {
            foreach (var p in llama.parameters()) p.normal_(0, 0.2);
            var (q, k, v) = (llama.q_proj, llama.k_proj, llama.v_proj);
            intern.wqkv.weight.copy_(FusedDecoder.PackGroupedQkv(q.weight, k.weight, v.weight, c));
            intern.wo.weight.copy_(llama.o_proj.weight);
            if (bias)
            {
                intern.wqkv.bias!.copy_(FusedDecoder.PackGroupedQkv(q.bias!, k.bias!, v.bias!, c));
                intern.wo.bias!.zero_();
            }
        }
        var x = randn(2, 5, 48);
        var positions = arange(5).unsqueeze(0).expand(2, 5);
        var rope = new RotaryEmbedding(c).Tables(positions, 5, ScalarType.Float32);
        using var noGrad = no_grad();
        var expected = llama.Forward(x, rope, new DecoderInputs());
        var actual = intern.Forward(x, rope, new DecoderInputs());
        Assert.True((expected - actual).abs().max().item<float>() < 1e-5);
    }

    [Fact]
    public void Qwen2AndQwen3AreSupportedAndPhi3SaysWhyNot()
    {
        using var qwen2 = VlmTune.Checkpoints.InternVLModelLoader.Load(Support.FamilyFixtures.ModelDir("qwen2"), new ModelOptions { DType = ScalarType.BFloat16 });
        var problem = Assert.Single(FusedDecoder.Problems(qwen2.language_model));   // q/k/v biases are handled
        Assert.Contains("not CUDA", problem);
        using var qwen3 = VlmTune.Checkpoints.InternVLModelLoader.Load(Support.FamilyFixtures.ModelDir("qwen3"), new ModelOptions { DType = ScalarType.BFloat16 });
        Assert.Contains("not CUDA", Assert.Single(FusedDecoder.Problems(qwen3.language_model)));   // q/k norms and the tied head too
        var norm = ((LlamaForCausalLM)qwen3.language_model).model.layers[1].self_attn.k_norm!;
        norm.weight = new TorchSharp.Modules.Parameter(norm.weight.to_type(ScalarType.Float32), requires_grad: false);   // the kernels read bf16
        Assert.Contains(FusedDecoder.Problems(qwen3.language_model), p => p.Contains("not bfloat16: layers.1.k_norm (Float32)"));
        using var phi3 = VlmTune.Checkpoints.InternVLModelLoader.Load(Support.FamilyFixtures.ModelDir("phi3"), new ModelOptions { DType = ScalarType.BFloat16 });
        Assert.Contains("Phi3ForCausalLM", Assert.Single(FusedDecoder.Problems(phi3.language_model)));
        var llama = (LlamaForCausalLM)qwen2.language_model;
        llama.model.layers[0].mlp.up_proj.AddLora(2, 4, 0, ScalarType.BFloat16);
        Assert.Contains(FusedDecoder.Problems(qwen2.language_model), p => p.Contains("unmerged LoRA") && p.Contains("layers.0.mlp.up_proj"));
    }
}
