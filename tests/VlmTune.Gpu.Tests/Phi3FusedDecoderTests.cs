using VlmTune.Gpu.Tests.Support;
using VlmTune.Inference;
using VlmTune.Models;

namespace VlmTune.Gpu.Tests;

/// <summary>
/// Phi-3 (InternVL2-4B's LLM) through the fused decoder, against the TorchSharp decode path as
/// <see cref="FusedDecoderNumericsTests"/> compares them: its stacked qkv_proj packed into the kernels' grouped order,
/// its gate_up_proj read in place as two row ranges, head_dim 96 (12 16-byte slices: the attention kernel's padding
/// lanes), and longrope (the short or the long inv_freq table per step, cos/sin scaled), on the random models of
/// <see cref="DecodeModels.Phi3"/>.
/// </summary>
[Trait("Category", "Gpu")]
public class Phi3FusedDecoderTests(ITestOutputHelper output)
{
    /// <summary>The model whose decoding crosses from the short to the long factors: a 64-token original context.</summary>
    public const string LongRopeModel = "phi3-d96-g4";

    /// <summary>
    /// A prompt inside the original context whose decode steps pass it: the first steps' sequences (61…64 tokens) take
    /// the short factors, the last four (65…68) the long ones, over keys cached under the short ones.
    /// </summary>
    public const int CrossingPrompt = 60, CrossingSteps = 8;

    public static TheoryData<string, int, Rows, Gemv> Cases() => FusedDecoderNumericsTests.CasesOf(DecodeModels.Phi3);

    [GpuTheory]
    [MemberData(nameof(Cases))]
    public void FusedStepsMatchTheTorchSharpDecoder(string model, int batch, Rows rows, Gemv gemv) =>
        FusedDecoderNumericsTests.AssertFusedStepsMatch(output, model, batch, rows, gemv, FusedDecoderNumericsTests.PromptTokens, FusedDecoderNumericsTests.Steps);

    [GpuTheory]
    [InlineData(1, Rows.Aligned, Gemv.CudaCores)]
    [InlineData(3, Rows.Ragged, Gemv.CudaCores)]
    [InlineData(13, Rows.Ragged, Gemv.TensorCores)]
    public void LongRopeSwitchesToTheLongFactorsWhileDecoding(int batch, Rows rows, Gemv gemv)
    {
        AssertCrossing(DecodeModels.ShapeTrueConfig(LongRopeModel));
        FusedDecoderNumericsTests.AssertFusedStepsMatch(output, LongRopeModel, batch, rows, gemv, CrossingPrompt, CrossingSteps);
    }

    /// <summary>
    /// The fused decoder of the same weights without the cos/sin scale (max_position_embeddings = original: scale 1,
    /// the same factors) against the scaled model's TorchSharp path must fail the comparison: the scale the kernels
    /// apply is one the tests can see.
    /// </summary>
    [GpuFact]
    public void WithoutTheCosSinScaleTheFusedStepsDisagree()
    {
        var device = TestDevice.Cuda;
        var lm = DecodeModels.Get(LongRopeModel, device);
        using var unscaled = DecodeModels.NewShapeTrue(LongRopeModel, device, edit: c => c with { MaxPositionEmbeddings = c.OriginalMaxPositionEmbeddings });
        Assert.Equal(1, unscaled.Rotary.CosSinScale());
        var fused = FusedDecoder.TryGet(unscaled, enabled: true, out var reason);
        Assert.True(fused is not null, $"the fused decoder is unavailable: {reason}");
        using var result = DecodeComparison.Run(lm, device, 3, ragged: true, CrossingPrompt, CrossingSteps, (token, cache, r) =>
        {
            Assert.True(fused!.CanStep(cache), "the fused decoder declines the step");
            return fused.Step(token, cache, r.Positions, r.FirstColumn);
        }, seed: 7);
        foreach (var step in result.Steps) output.WriteLine(step.ToString());
        Assert.True(DecodeComparison.Failures(result.Steps) is not null, "the unscaled fused decoder stayed within the tolerance:\n" + string.Join("\n", result.Steps));
    }

    /// <summary>
    /// What the crossing case needs of its model (checked on the CPU too, CpuRehearsalTests): a scale ≠ 1, short and
    /// long factors that differ, and a prompt and step count that straddle the original context.
    /// </summary>
    public static void AssertCrossing(LlmConfig c)
    {
        var rotary = new RotaryEmbedding(c);
        Assert.NotEqual(1, rotary.CosSinScale());
        Assert.NotEqual(c.RopeScaling!.ShortFactor!, c.RopeScaling.LongFactor!);
        Assert.False(rotary.UsesLongFactors(CrossingPrompt + 1), "the first decode step already takes the long factors");
        Assert.True(rotary.UsesLongFactors(CrossingPrompt + CrossingSteps), "the last decode step still takes the short factors");
        Assert.True(CrossingPrompt + CrossingSteps - c.OriginalMaxPositionEmbeddings >= 2, "fewer than two steps on the long factors");
    }
}
