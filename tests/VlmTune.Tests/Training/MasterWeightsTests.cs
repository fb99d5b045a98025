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

    [Fact]
    public void OffloadedMastersTakeWidenedGradientsAndLoadByMappedName()
    {
        using var scope = NewDisposeScope();
        var w = new Parameter(full(3, 0.5f, ScalarType.BFloat16), requires_grad: true);
        using var masters = MasterWeights.Create([("language_model.x.lora_A.weight", w)], masterDevice: CPU);
        var master = masters.Pairs[0].Master;
        Assert.Equal(ScalarType.Float32, master.dtype);
        Assert.NotSame(w, master);
        (w.to_type(ScalarType.Float32) * 2).sum().backward();
        masters.GradientsToMasters();
        Assert.Equal(2f, master.grad![0].item<float>());

        // A PEFT file names the tensor its own way; the fp32 value (not representable in bf16) reaches the master exactly.
        string dir = Path.Combine(Path.GetTempPath(), "vlmtune-masters-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            string file = Path.Combine(dir, "a.safetensors");
            VlmTune.Checkpoints.SafetensorsWriter.Write(file, [new("base_model.model.x.lora_A.weight", full(3, 0.1234567f))]);
            using var f = VlmTune.Checkpoints.SafetensorsFile.Open(file);
            masters.Load(f, n => n.StartsWith("language_model.") ? VlmTune.Checkpoints.PeftAdapter.TensorName(n["language_model.".Length..]) : null);
            Assert.Equal(0.1234567f, master[1].item<float>());
            Assert.Equal(0.12353515625f, w[1].to_type(ScalarType.Float32).item<float>());   // the model holds it rounded to bf16
        }
        finally { Directory.Delete(dir, true); }
    }
}
