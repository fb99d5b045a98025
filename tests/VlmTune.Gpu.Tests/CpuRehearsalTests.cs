using VlmTune.Gpu.Tests.Support;
using VlmTune.Inference;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Gpu.Tests;

/// <summary>
/// The GPU tests' own code on the CPU, so a mistake in it shows up in CI rather than in a scarce GPU run: everything
/// but the kernels (which only the GPU runs) — the quantised-linear check end to end, the cache check with a
/// correct and a wrong candidate, and the Phi-3 models' fitness for the cases they are built for.
/// </summary>
public class CpuRehearsalTests
{
    [Theory]
    [InlineData(64, 96)]
    [InlineData(1537, 409)]
    public void QuantisedLinearCheckPassesOnTheCpu(int inFeatures, int outFeatures) =>
        Nf4KernelTests.CheckQuantisedLinear(CPU, inFeatures, outFeatures);

    [Theory]
    [InlineData(false, 0, true)]
    [InlineData(true, 0, true)]
    [InlineData(true, 1, false)]    // positions written one too far: the check must fail
    public void CacheCheckSeesThePositionsWritten(bool ragged, int shift, bool agree)
    {
        var lm = DecodeModels.Get("qwen3", CPU);
        using var result = DecodeComparison.Run(lm, CPU, 3, ragged, 40, 3, (token, cache, rows) =>
        {
            var positions = rows.Positions is null ? null : rows.Positions + shift;
            return lm.Logits(lm.Forward(lm.Embed(token), new DecoderInputs { PositionIds = positions, Cache = cache, KeyMask = rows.KeyMask }))[.., 0];
        }, seed: 5);
        Assert.Equal(43, result.Reference.Length);
        Assert.Equal(agree, result.CachesAgree());
    }

    /// <summary>
    /// The Phi-3 test models are ones the fused decoder takes (on CUDA: the device is the only objection on the CPU),
    /// take the tensor-core GEMV where their cases ask for it, and carry a cos/sin scale ≠ 1; the crossing case's model
    /// and prompt straddle the original context. The 250-token cases stay on one factor table: the short one for
    /// phi3-d96 (a 4096-token original context), the long one for phi3-d96-g4 (64).
    /// </summary>
    [Theory]
    [InlineData("phi3-d96", false)]
    [InlineData("phi3-d96-g4", true)]
    public void Phi3TestModelsFitTheirCases(string model, bool longFactors)
    {
        var lm = DecodeModels.Get(model, CPU);
        Assert.IsType<Phi3ForCausalLM>(lm);
        Assert.Contains("not CUDA", Assert.Single(FusedDecoder.Problems(lm)));
        Assert.True(FusedDecodePlan.UseTensorCores(8, (8, 0), lm.Config));
        Assert.NotEqual(1, lm.Rotary.CosSinScale());
        int first = FusedDecoderNumericsTests.PromptTokens + 1, last = FusedDecoderNumericsTests.PromptTokens + FusedDecoderNumericsTests.Steps;
        Assert.Equal((longFactors, longFactors), (lm.Rotary.UsesLongFactors(first), lm.Rotary.UsesLongFactors(last)));
        if (model == Phi3FusedDecoderTests.LongRopeModel) Phi3FusedDecoderTests.AssertCrossing(lm.Config);
    }
}
