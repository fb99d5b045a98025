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
    public void Qwen2AndQwen3AreSupported()
    {
        using var qwen2 = VlmTune.Checkpoints.InternVLModelLoader.Load(Support.FamilyFixtures.ModelDir("qwen2"), new ModelOptions { DType = ScalarType.BFloat16 });
        var problem = Assert.Single(FusedDecoder.Problems(qwen2.language_model));   // q/k/v biases are handled
        Assert.Contains("not CUDA", problem);
        using var qwen3 = VlmTune.Checkpoints.InternVLModelLoader.Load(Support.FamilyFixtures.ModelDir("qwen3"), new ModelOptions { DType = ScalarType.BFloat16 });
        Assert.Contains("not CUDA", Assert.Single(FusedDecoder.Problems(qwen3.language_model)));   // q/k norms and the tied head too
        var norm = ((LlamaForCausalLM)qwen3.language_model).model.layers[1].self_attn.k_norm!;
        norm.weight = new TorchSharp.Modules.Parameter(norm.weight.to_type(ScalarType.Float32), requires_grad: false);   // the kernels read bf16
        Assert.Contains(FusedDecoder.Problems(qwen3.language_model), p => p.Contains("not bfloat16: layers.1.k_norm (Float32)"));
        var llama = (LlamaForCausalLM)qwen2.language_model;
        llama.model.layers[0].mlp.up_proj.AddLora(2, 4, 0, ScalarType.BFloat16);
        Assert.Contains(FusedDecoder.Problems(qwen2.language_model), p => p.Contains("unmerged LoRA") && p.Contains("layers.0.mlp.up_proj"));
    }
}

/// <summary>
/// Phi-3 on the fused path: its stacked qkv_proj packed into the kernels' grouped order must compute what the InternLM2
/// attention computes with that packed wqkv, its gate_up_proj's two row ranges must be the gate and the up projection,
/// and a bf16 checkpoint (the family fixture: longrope) is refused for the device alone, with the fused modules' own
/// names for what the kernels cannot read.
/// </summary>
public class FusedDecoderPhi3Tests
{
    private static LlmConfig Config(int heads, int kvHeads, bool bias) => new()
    {
        Architecture = LlmArchitectures.Phi3, HiddenSize = 48, NumHiddenLayers = 1, NumAttentionHeads = heads, NumKeyValueHeads = kvHeads,
        IntermediateSize = 32, VocabSize = 64, HeadDim = 8, QkvBias = bias,
    };

    [Theory]
    [InlineData(6, 2, true)]    // 3 query heads per KV head, with a qkv_proj bias
    [InlineData(4, 4, false)]   // one per KV head, as Phi-3-mini
    public void PackedQkvGivesThePhi3AttentionThroughTheInternLM2Layout(int heads, int kvHeads, bool bias)
    {
        using var scope = NewDisposeScope();
        var c = Config(heads, kvHeads, bias);
        var o = new ModelOptions { Attention = AttentionKind.Exact };
        using var phi3 = new Phi3Attention(c, o, 0);
        using var intern = new InternLM2Attention(c with { Architecture = LlmArchitectures.InternLM2, QkvBias = false, Bias = bias }, o, 0);
        using (no_grad())
        {
            foreach (var p in phi3.parameters()) p.normal_(0, 0.2);
            intern.wqkv.weight.copy_(FusedDecoder.PackStackedQkv(phi3.qkv_proj.weight, c));
            intern.wo.weight.copy_(phi3.o_proj.weight);
            if (bias)
            {
                intern.wqkv.bias!.copy_(FusedDecoder.PackStackedQkv(phi3.qkv_proj.bias!, c));
                intern.wo.bias!.zero_();
            }
        }
        var x = randn(2, 5, 48);
        var positions = arange(5).unsqueeze(0).expand(2, 5);
        var rope = new RotaryEmbedding(c).Tables(positions, 5, ScalarType.Float32);
        using var noGrad = no_grad();
        var expected = phi3.Forward(x, rope, new DecoderInputs());
        var actual = intern.Forward(x, rope, new DecoderInputs());
        Assert.True((expected - actual).abs().max().item<float>() < 1e-5);
    }

    [Fact]
    public void StackedQkvPacksAsItsQueryKeyAndValueRowsWould()
    {
        using var scope = NewDisposeScope();
        var c = Config(6, 2, bias: true);
        long q = 6 * 8, kv = 2 * 8;
        var (wq, wk, wv) = (randn(q, 48), randn(kv, 48), randn(kv, 48));
        Assert.True(Same(FusedDecoder.PackStackedQkv(cat([wq, wk, wv], 0), c), FusedDecoder.PackGroupedQkv(wq, wk, wv, c)));
        var (bq, bk, bv) = (randn(q), randn(kv), randn(kv));
        Assert.True(Same(FusedDecoder.PackStackedQkv(cat([bq, bk, bv], 0), c), FusedDecoder.PackGroupedQkv(bq, bk, bv, c)));
    }

    [Fact]
    public void GateUpRowsAreTheGateThenTheUpProjection()
    {
        using var scope = NewDisposeScope();
        var c = Config(6, 2, bias: false);
        using var mlp = new Phi3Mlp(c, new ModelOptions { DType = ScalarType.Float32 });
        using (no_grad()) foreach (var p in mlp.parameters()) p.normal_(0, 0.2);
        var w = mlp.gate_up_proj.weight;
        var (gate, up) = FusedDecoder.GateUpPointers(w, c.IntermediateSize);
        Assert.Equal(VlmTune.Cuda.TensorPointers.DataPointer(w), gate);
        Assert.Equal(gate + c.IntermediateSize * c.HiddenSize * sizeof(float), up);
        // What the gated GEMV computes from those rows, silu(x·gateᵀ)·(x·upᵀ), is the module's product.
        var x = randn(3, 48);
        using var noGrad = no_grad();
        var product = nn.functional.silu(x.matmul(w.narrow(0, 0, c.IntermediateSize).t())) * x.matmul(w.narrow(0, c.IntermediateSize, c.IntermediateSize).t());
        Assert.True((mlp.down_proj.forward(product) - mlp.forward(x)).abs().max().item<float>() < 1e-5);
    }

    /// <summary>The decoder's two inv_freq tables are what <see cref="RotaryEmbedding.InvFreq"/> gives on either side of the original context.</summary>
    [Fact]
    public void LongRopeTablesAreTheTorchSharpPathsOnEitherSideOfTheOriginalContext()
    {
        using var scope = NewDisposeScope();
        using var phi3 = VlmTune.Checkpoints.InternVLModelLoader.Load(Support.FamilyFixtures.ModelDir("phi3"), new ModelOptions { DType = ScalarType.BFloat16 });
        var lm = phi3.language_model;
        var (shortTable, longTable) = FusedDecoder.InvFreqTables(lm, CPU);
        Assert.False(Same(shortTable, longTable));
        long original = lm.Config.OriginalMaxPositionEmbeddings;
        foreach (long length in new[] { 1, original, original + 1, 4 * original })
            Assert.True(Same(lm.Rotary.InvFreq(lm.Config.RopeTheta, CPU, length), lm.Rotary.UsesLongFactors(length) ? longTable : shortTable), $"sequence length {length}");
        Assert.False(lm.Rotary.UsesLongFactors(original));
        Assert.True(lm.Rotary.UsesLongFactors(original + 1));
        // Without longrope: one table.
        using var qwen2 = VlmTune.Checkpoints.InternVLModelLoader.Load(Support.FamilyFixtures.ModelDir("qwen2"), new ModelOptions { DType = ScalarType.BFloat16 });
        var (one, same) = FusedDecoder.InvFreqTables(qwen2.language_model, CPU);
        Assert.Same(one, same);
    }

    /// <summary>The kernels' cos/sin: fp32 cos times the scale as an fp32 number, then rounded; the TorchSharp tables' double scale must round the same.</summary>
    [Fact]
    public void CosSinScaleIsAppliedInFp32BeforeRounding()
    {
        using var scope = NewDisposeScope();
        using var phi3 = VlmTune.Checkpoints.InternVLModelLoader.Load(Support.FamilyFixtures.ModelDir("phi3"), new ModelOptions { DType = ScalarType.BFloat16 });
        var rotary = phi3.language_model.Rotary;
        double scale = rotary.CosSinScale();
        Assert.NotEqual(1, scale);
        long length = 300;   // past the fixture's 256-token original context: the long factors
        var positions = arange(length).unsqueeze(0);
        var freqs = positions.to_type(ScalarType.Float32).unsqueeze(-1) * rotary.InvFreq(phi3.language_model.Config.RopeTheta, CPU, length);   // (1, T, d/2)
        var emb = cat([freqs, freqs], -1).unsqueeze(1);                                                                                          // (1, 1, T, d), as Tables lays it out
        var fp32Scale = tensor((float)scale);
        var tables = rotary.Tables(positions, length, ScalarType.Float32);
        Assert.True(Same(tables.Cos, emb.cos() * fp32Scale));
        Assert.True(Same(tables.Sin, emb.sin() * fp32Scale));
        var bf16 = rotary.Tables(positions, length, ScalarType.BFloat16);
        Assert.True(Same(bf16.Cos, (emb.cos() * fp32Scale).to_type(ScalarType.BFloat16)));
    }

    [Fact]
    public void Bf16LongRopeCheckpointFailsOnlyOnTheDevice()
    {
        using var phi3 = VlmTune.Checkpoints.InternVLModelLoader.Load(Support.FamilyFixtures.ModelDir("phi3"), new ModelOptions { DType = ScalarType.BFloat16 });
        Assert.Equal("longrope", phi3.language_model.Config.RopeScaling?.Type);
        Assert.Contains("not CUDA", Assert.Single(FusedDecoder.Problems(phi3.language_model)));
    }

    [Fact]
    public void UnmergedLoraQuantisedAndNonBf16WeightsAreNamedByTheFusedModules()
    {
        using var phi3 = VlmTune.Checkpoints.InternVLModelLoader.Load(Support.FamilyFixtures.ModelDir("phi3"), new ModelOptions { DType = ScalarType.BFloat16 });
        var lm = (Phi3ForCausalLM)phi3.language_model;
        lm.model.layers[1].self_attn.qkv_proj.AddLora(2, 4, 0, ScalarType.BFloat16);
        lm.model.layers[0].mlp.gate_up_proj.AddLora(2, 4, 0, ScalarType.BFloat16);
        VlmTune.Quantization.Nf4.QuantizeLinear(lm.model.layers[0].mlp.down_proj, cudaKernel: false);
        var o = lm.model.layers[1].self_attn.o_proj;
        o.weight = new TorchSharp.Modules.Parameter(o.weight.to_type(ScalarType.Float32), requires_grad: false);
        var problems = FusedDecoder.Problems(lm);
        Assert.Contains(problems, p => p.Contains("unmerged LoRA") && p.Contains("layers.0.mlp.gate_up_proj") && p.Contains("layers.1.self_attn.qkv_proj"));
        Assert.Contains(problems, p => p.Contains("quantised") && p.Contains("layers.0.mlp.down_proj"));
        Assert.Contains(problems, p => p.Contains("not bfloat16: layers.1.self_attn.o_proj (Float32)"));
    }

    [Fact]
    public void BiasesOtherThanQkvProjAreNotSupported()
    {
        var c = Config(6, 2, bias: true) with { MlpBias = true };
        using var lm = new Phi3ForCausalLM(c, new ModelOptions { DType = ScalarType.BFloat16 });
        Assert.Contains(FusedDecoder.Problems(lm), p => p.Contains("linear layers with bias (other than q/k/v)"));
        using var qkvBiasOnly = new Phi3ForCausalLM(Config(6, 2, bias: true), new ModelOptions { DType = ScalarType.BFloat16 });
        Assert.Contains("not CUDA", Assert.Single(FusedDecoder.Problems(qkvBiasOnly)));
    }

    [Fact]
    public void HeadDim96IsSupported()
    {
        // Phi-3-mini's heads: 12 16-byte slices, not a power of two (the attention kernel pads its lane groups).
        var c = Config(4, 4, bias: false) with { HiddenSize = 384, HeadDim = 96 };
        using var lm = new Phi3ForCausalLM(c, new ModelOptions { DType = ScalarType.BFloat16 });
        Assert.Contains("not CUDA", Assert.Single(FusedDecoder.Problems(lm)));
    }

    private static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.equal(b).all().item<bool>();
}
