using TorchSharp;
using TorchSharp.Modules;
using VlmTune.Training;
using static TorchSharp.torch;

namespace VlmTune.Tests.Training;

public sealed class MasterWeightsTests
{
    [Fact]
    public void SmallUpdatesAccumulateInFp32MastersOfBf16Weights()
    {
        using var scope = NewDisposeScope();
        var bf16 = new Parameter(ones(4, ScalarType.BFloat16), requires_grad: true);
        var fp32 = new Parameter(ones(4), requires_grad: true);
        using var masters = MasterWeights.Create([("w", bf16), ("lora", fp32)]);
        Assert.True(masters.Any);
        Assert.Same(fp32, masters.Pairs[1].Master);
        using var opt = optim.SGD(masters.OptimizerParameters, 1e-3);
        for (int i = 0; i < 10; i++)
        {
            (bf16.to_type(ScalarType.Float32).sum() + fp32.sum()).backward();   // gradient 1 everywhere
            masters.GradientsToMasters();
            Assert.Equal(0f, bf16.grad!.abs().sum().to_type(ScalarType.Float32).item<float>());   // handed over
            opt.step();
            opt.zero_grad();
            masters.MastersToModel();
        }
        // Each step moves the weight by 1e-3, below half of bf16's spacing near 1 (2^-8): a bf16 weight would never move.
        Assert.Equal(0.99f, masters.Pairs[0].Master[0].item<float>(), 5);
        Assert.Equal(0.98828125f, bf16[0].to_type(ScalarType.Float32).item<float>());   // 0.99 rounded to bf16 (spacing 2^-8 below 1)
        Assert.Equal(0.99f, fp32[0].item<float>(), 5);
    }
}
