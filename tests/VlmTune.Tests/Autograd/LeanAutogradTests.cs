using TorchSharp;
using VlmTune.Autograd;
using static TorchSharp.torch;

namespace VlmTune.Tests.Autograd;

/// <summary>TorchSharp keeps an empty_like of every custom-function output until backward; LeanAutograd drops it.</summary>
public sealed class LeanAutogradTests
{
    private sealed class Double : autograd.SingleTensorFunction<Double>
    {
        public static autograd.AutogradContext? Context;
        public static Tensor? Returned;
        public static bool Lean;
        public override string Name => nameof(Double);

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            Context = ctx;
            var y = (Tensor)vars[0] * 2;
            Returned = y;
            if (Lean) LeanAutograd.Remember(ctx, y);
            return y;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad) => [grad * 2];
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void OutputCacheBecomesAZeroStrideViewAndGradientsStayRight(bool lean)
    {
        using var scope = NewDisposeScope();
        var x = randn(64, 32).requires_grad_(true);
        Double.Lean = lean;
        var y = Double.apply(x);
        if (lean) y = LeanAutograd.AfterApply(y);

        var cache = LeanAutograd.OutputCacheOf(Double.Context!);
        Assert.NotNull(cache);                                   // the TorchSharp internals this relies on are there
        var entry = Assert.Single(cache!);
        Assert.Equal(new long[] { 64, 32 }, entry.shape);
        if (lean)
        {
            Assert.All(entry.stride(), s => Assert.Equal(0, s));     // one element, broadcast
            Assert.True(Double.Returned!.IsInvalid);                  // our forward handle released
        }
        else Assert.True(entry.is_contiguous());                    // TorchSharp's own: a full-size tensor

        (y * y).sum().backward();
        Assert.True(x.grad!.allclose(x.detach() * 8));              // d/dx (2x)² = 8x
    }
}
