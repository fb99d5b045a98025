using VlmTune.Gpu.Tests.Support;
using static TorchSharp.torch;

namespace VlmTune.Gpu.Tests;

/// <summary>The comparison the GPU decoder tests rely on, checked on the CPU.</summary>
public class LogitToleranceTests
{
    [Theory]
    [InlineData(1.0, 1.0 / 128)]
    [InlineData(1.99, 1.0 / 128)]
    [InlineData(2.0, 1.0 / 64)]
    [InlineData(5.3, 1.0 / 32)]      // bench --check's largest logits: 0.15 there is ~5 ulps
    [InlineData(0.3, 1.0 / 512)]
    public void Bf16UlpHasEightSignificantBits(double x, double ulp)
    {
        Assert.Equal(ulp, LogitTolerance.Bf16Ulp(x));
        // Adding one ulp changes a bf16 value; half an ulp rounds back (to even).
        float v = (float)x;
        Assert.NotEqual(Bf16(v), Bf16(v + (float)ulp));
    }

    [Fact]
    public void ErrorsAtTheBoundAreDecidedByItsEdge()
    {
        using var scope = NewDisposeScope();
        var want = tensor(new float[] { 3.0f, 1.0f, -2.0f, 0.5f, 2.1f, -1.5f, 0.25f, 2.0f }).view(2, 4);   // max |logit| 3: ulp 1/64, bound 1/8
        Assert.True(LogitTolerance.Compare(0, want, want.clone()).Within);
        var inside = want.clone();
        inside[1, 2] += 0.125f;                                 // exactly the bound
        var s = LogitTolerance.Compare(0, want, inside);
        Assert.Equal(0.125, s.Tolerance);
        Assert.True(s.MaxAbsDiff <= s.Tolerance);
        var outside = want.clone();
        outside[1, 2] += 0.127f;
        Assert.False(LogitTolerance.Compare(0, want, outside).Within);
        // Row 0's top-2 margin (2) exceeds twice the bound, row 1's (0.1) does not: only row 0's choice must agree.
        var flipped = want.clone();
        flipped[0, 3] += 2.7f;                                  // 3.2: now row 0's argmax
        flipped[1, 3] += 0.2f;                                  // 2.2: row 1's argmax flips too, which is allowed
        var f = LogitTolerance.Compare(0, want, flipped);
        Assert.Equal(1, f.ClearChoices);
        Assert.Equal(1, f.ClearDisagreements);
        Assert.False(f.Within);
    }

    [Fact]
    public void AnErrorSpreadOverEveryLogitFailsTheCosine()
    {
        using var scope = NewDisposeScope();
        random.manual_seed(3);
        var want = randn(1, 4096);                               // max |logit| ~3.5–4: bound 1/8
        var noise = (rand(1, 4096) - 0.5) * 0.2;                 // |Δ| ≤ 0.1 everywhere: inside the max-abs bound
        var s = LogitTolerance.Compare(0, want, want + noise);
        Assert.True(s.MaxAbsDiff <= s.Tolerance);
        Assert.True(s.MinCentredCosine < LogitTolerance.MinCentredCosine);   // RMS 0.058 of a spread of 1: 1 − cos ≈ 1.7e-3
        Assert.False(s.Within);
    }

    private static ushort Bf16(float f) => (ushort)(tensor(f).to_type(ScalarType.BFloat16).to_type(ScalarType.Float32).item<float>() is var r
        ? BitConverter.SingleToInt32Bits(r) >> 16 : 0);
}
