using VlmTune.Gpu.Tests.Support;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Gpu.Tests;

/// <summary>
/// The GPU tests' own code on the CPU, so a mistake in it shows up in CI rather than in a scarce GPU run: everything
/// but the kernels (which only the GPU runs) — the quantised-linear check end to end, and the cache check with a
/// correct and a wrong candidate.
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
}
