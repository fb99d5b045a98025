using VlmTune.Gpu.Tests.Support;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Gpu.Tests;

/// <summary>
/// The decoder tests' tolerance must sit between rounding noise and the bugs a decode kernel is likely to have. These
/// run on the CPU (here and in CI), with the same comparison on the same shape-true models in bf16: the TorchSharp path
/// against itself with another attention kernel (noise: must pass), and against itself with one planted bug (must
/// fail). If a planted bug ever stays inside, the tolerance has become too loose to trust the GPU tests' passes; if
/// the noise case fails, too tight. The tiny checkpoints are not used here: their random attention is nearly uniform,
/// so a position or bias bug barely moves their logits (≈ 2.5 and 7 ulps measured), which is why the GPU tests also
/// decode the shape-true models.
/// </summary>
public class ToleranceSensitivityTests(ITestOutputHelper output)
{
    private const int PromptTokens = 40, Steps = 4, Batch = 3;

    private static readonly Device Cpu = CPU;

    [Theory]
    [InlineData("qwen2-d128")]
    [InlineData("qwen3-d128")]
    [InlineData("phi3-d96")]
    public void AnotherAttentionKernelStaysWithinTheTolerance(string model)
    {
        // Exact attention (matmul + fp32 softmax) instead of SDPA: another summation order, as the fused kernels have.
        using var exact = DecodeModels.NewShapeTrue(model, Cpu, AttentionKind.Exact);
        var steps = Compare(model, Stepper(exact));
        Assert.True(DecodeComparison.Failures(steps) is null, DecodeComparison.Failures(steps));
    }

    [Theory]
    [InlineData("internlm2-d128")]
    [InlineData("llama-d128")]
    public void PositionOffByOneIsCaught(string model) =>
        AssertCaught(Compare(model, Stepper(DecodeModels.Get(model, Cpu), shiftPositions: 1)));

    [Theory]
    [InlineData("internlm2-d128")]
    [InlineData("qwen3-d128")]
    public void OneMoreMaskedKeyIsCaught(string model) =>
        AssertCaught(Compare(model, Stepper(DecodeModels.Get(model, Cpu), maskOneMore: true)));

    [Fact]
    public void DroppedQkvBiasIsCaught()
    {
        using var planted = Planted("qwen2-d128", name => name.EndsWith(".bias", StringComparison.Ordinal), 0);
        AssertCaught(Compare("qwen2-d128", Stepper(planted)));
    }

    [Fact]
    public void IgnoredQkNormWeightsAreCaught()
    {
        using var planted = Planted("qwen3-d128", name => name.Contains("q_norm") || name.Contains("k_norm"), 1);
        AssertCaught(Compare("qwen3-d128", Stepper(planted)));
    }

    [Fact]
    public void IgnoredFinalNormWeightIsCaught()
    {
        using var planted = Planted("llama-d128", name => name == "model.norm.weight", 1);
        AssertCaught(Compare("llama-d128", Stepper(planted)));
    }

    // Phi-3 longrope, on the GPU crossing case's model and prompt (Phi3FusedDecoderTests): 4 steps on the short
    // factors, then 4 on the long ones.
    private const string LongRope = Phi3FusedDecoderTests.LongRopeModel;

    [Fact]
    public void AnotherAttentionKernelStaysWithinTheToleranceAcrossTheLongRopeSwitch()
    {
        using var exact = DecodeModels.NewShapeTrue(LongRope, Cpu, AttentionKind.Exact);
        var steps = CompareCrossing(Stepper(exact));
        Assert.True(DecodeComparison.Failures(steps) is null, DecodeComparison.Failures(steps));
    }

    [Fact]
    public void LongRopeCosSinScaleLeftOutIsCaught()
    {
        // max_position_embeddings = original: the same factors, scale 1.
        using var unscaled = DecodeModels.NewShapeTrue(LongRope, Cpu, edit: c => c with { MaxPositionEmbeddings = c.OriginalMaxPositionEmbeddings });
        AssertCaught(CompareCrossing(Stepper(unscaled)));
    }

    [Fact]
    public void LongRopeStayingOnTheShortFactorsIsCaught()
    {
        using var shortOnly = DecodeModels.NewShapeTrue(LongRope, Cpu, edit: c => c with { RopeScaling = c.RopeScaling! with { LongFactor = c.RopeScaling.ShortFactor } });
        var steps = CompareCrossing(Stepper(shortOnly));
        Assert.True(DecodeComparison.Failures([.. steps.Take(4)]) is null, "the steps before the switch should agree:\n" + string.Join("\n", steps));
        AssertCaught(steps);
    }

    private IReadOnlyList<StepAgreement> CompareCrossing(DecodeComparison.Stepper candidate) =>
        Compare(LongRope, candidate, Phi3FusedDecoderTests.CrossingPrompt, Phi3FusedDecoderTests.CrossingSteps);

    private IReadOnlyList<StepAgreement> Compare(string model, DecodeComparison.Stepper candidate, int promptTokens = PromptTokens, int steps = Steps)
    {
        using var result = DecodeComparison.Run(DecodeModels.Get(model, Cpu), Cpu, Batch, ragged: true, promptTokens, steps, candidate, seed: 5);
        foreach (var s in result.Steps) output.WriteLine(s.ToString());
        return result.Steps;
    }

    private static void AssertCaught(IReadOnlyList<StepAgreement> steps) =>
        Assert.True(DecodeComparison.Failures(steps) is not null, "the planted bug stayed within the tolerance:\n" + string.Join("\n", steps));

    /// <summary>A copy of the model with the matching parameters filled with <paramref name="value"/> (a kernel that skips them).</summary>
    private static CausalLanguageModel Planted(string model, Func<string, bool> which, double value)
    {
        var lm = DecodeModels.NewShapeTrue(model, Cpu);
        using (no_grad())
        {
            int planted = 0;
            foreach (var (name, p) in lm.named_parameters())
                if (which(name)) { p.fill_(value); planted++; }
            Assert.True(planted > 0, $"nothing to plant the bug in for {model}");
        }
        return lm;
    }

    /// <summary>The TorchSharp decode step of <paramref name="lm"/>, with a planted position or mask bug when asked.</summary>
    private static DecodeComparison.Stepper Stepper(CausalLanguageModel lm, int shiftPositions = 0, bool maskOneMore = false) => (token, cache, rows) =>
    {
        var positions = rows.Positions is null ? null : rows.Positions + shiftPositions;
        var mask = rows.KeyMask;
        if (maskOneMore && mask is not null)
        {
            // Hide each row's first valid key as well.
            var first = mask.to_type(ScalarType.Int64).argmax(1, keepdim: true);                      // (B, 1)
            mask = mask.logical_and(arange(mask.shape[1]).unsqueeze(0).ne(first));
        }
        var h = lm.Forward(lm.Embed(token), new DecoderInputs { PositionIds = positions, Cache = cache, KeyMask = mask });
        return lm.Logits(h)[.., 0];
    };
}
