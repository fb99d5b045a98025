using VlmTune.Autograd;
using VlmTune.Checkpoints;
using VlmTune.Models;
using VlmTune.Quantization;
using VlmTune.Tests.Support;
using VlmTune.Tests.Training;
using VlmTune.Training;
using static TorchSharp.torch;

namespace VlmTune.Tests.Quantization;

public sealed class Nf4Tests
{
    [Fact]
    public void ThresholdsAreMidpointsOfTheCodebook()
    {
        Assert.Equal(16, Nf4.Values.Length);
        Assert.Equal(15, Nf4.Thresholds.Length);
        for (int i = 0; i < 15; i++)
            Assert.True(Math.Abs(Nf4.Thresholds[i] - (Nf4.Values[i] + Nf4.Values[i + 1]) / 2) < 1e-6, $"threshold {i}");
        Assert.Equal(0f, Nf4.Values[7]);
    }

    [Fact]
    public void HandBuiltBlockQuantisesToItsCodesHighNibbleFirst()
    {
        using var scope = NewDisposeScope();
        // Block 0: absmax 2, element j holds code j % 16 exactly; block 1: absmax 0.5, codes reversed.
        var codes = Enumerable.Range(0, 128).Select(j => j < 64 ? j % 16 : 15 - j % 16).ToArray();
        var values = codes.Select((c, j) => Nf4.Values[c] * (j < 64 ? 2f : 0.5f)).ToArray();
        using var q = Nf4.Quantize(tensor(values).view(8, 16), doubleQuant: false);
        Assert.Equal([2f, 0.5f], q.Absmax.data<float>().ToArray());
        var packed = q.Packed.data<byte>().ToArray();
        Assert.Equal(64, packed.Length);
        for (int i = 0; i < 64; i++) Assert.Equal((byte)(codes[2 * i] << 4 | codes[2 * i + 1]), packed[i]);
        var back = q.Dequantize();
        Assert.Equal(new long[] { 8, 16 }, back.shape);
        Assert.Equal(values, back.view(-1).data<float>().ToArray());
    }

    [Fact]
    public void EachValueGetsTheNearestCodeAndTheErrorIsBounded()
    {
        using var scope = NewDisposeScope();
        manual_seed(1);
        var w = randn(37, 50);    // 1850 values: 29 blocks, the last one partial
        using var q = Nf4.Quantize(w, doubleQuant: false);
        Assert.Equal(925, q.Packed.numel());
        Assert.Equal(29, q.Absmax.numel());
        var flat = w.view(-1).data<float>().ToArray();
        var absmax = q.Absmax.data<float>().ToArray();
        var deq = q.Dequantize().view(-1).data<float>().ToArray();
        double maxGap = Enumerable.Range(0, 15).Max(i => Nf4.Values[i + 1] - Nf4.Values[i]);
        for (int i = 0; i < flat.Length; i++)
        {
            float a = absmax[i / 64];
            Assert.Equal(flat.Skip(i / 64 * 64).Take(64).Max(Math.Abs), a);
            float x = flat[i] * (1f / a);
            int nearest = Enumerable.Range(0, 16).OrderBy(c => Math.Abs(Nf4.Values[c] - x)).First();
            Assert.Equal(Nf4.Values[nearest] * a, deq[i]);
            Assert.True(Math.Abs(deq[i] - flat[i]) <= maxGap / 2 * a + 1e-6);
        }
    }

    [Fact]
    public void DynamicMapIsBitsandbytesSignedMap()
    {
        var map = Nf4.DynamicMap().data<float>().ToArray();
        Assert.Equal(256, map.Length);
        Assert.True(map.Zip(map.Skip(1)).All(p => p.First <= p.Second), "sorted");
        Assert.Equal(1f, map[255]);
        Assert.Contains(0f, map);
        Assert.Equal(-0.99296875f, map[0], 6);                     // -(mean of the last two points of linspace(0.1, 1, 65))
        Assert.Equal(5.5e-7f, map.Where(v => v > 0).Min(), 9);     // 1e-6 × (0.1 + 1) / 2: the smallest positive value
    }

    [Fact]
    public void DynamicMapSearchPicksTheNearestCode()
    {
        using var scope = NewDisposeScope();
        manual_seed(2);
        var map = Nf4.DynamicMap();
        var mapValues = map.data<float>().ToArray();
        var x = cat([rand(2000) * 2 - 1, randn(200) * 1e-3f, tensor(new[] { -1f, 1f, 0f, 0.5f, -0.5f })]);
        var codes = Nf4.DynamicMapSearch(x, map).data<byte>().ToArray();
        var xs = x.data<float>().ToArray();
        for (int i = 0; i < xs.Length; i++)
        {
            double best = mapValues.Min(v => Math.Abs(v - xs[i]));
            Assert.True(Math.Abs(mapValues[codes[i]] - xs[i]) <= best + 1e-7, $"x={xs[i]} got {mapValues[codes[i]]}");
        }
    }

    [Fact]
    public void DoubleQuantisedAbsmaxStaysCloseAndDequantisationUsesIt()
    {
        using var scope = NewDisposeScope();
        manual_seed(3);
        var w = randn(64, 640) * 0.02f;   // 640 blocks of 64: three 256-blocks of statistics, the last partial
        using var plain = Nf4.Quantize(w, doubleQuant: false);
        using var dq = Nf4.Quantize(w, doubleQuant: true);
        Assert.True(dq.DoubleQuantized);
        Assert.Equal(ScalarType.Byte, dq.Absmax.dtype);
        Assert.Equal(3, dq.Absmax2!.numel());
        Assert.Equal(plain.Packed.data<byte>().ToArray(), dq.Packed.data<byte>().ToArray());   // codes do not depend on it
        Assert.Equal(plain.Absmax.mean().item<float>(), dq.Offset, 6);
        var exact = plain.Absmax;
        var approx = dq.BlockAbsmax();
        // 8-bit dynamic codes of (absmax - mean) / max|absmax - mean|: within 1% of the block statistics' spread.
        double spread = (exact - dq.Offset).abs().max().item<float>();
        Assert.True((approx - exact).abs().max().item<float>() <= 0.01 * spread);
        var expected = plain.Dequantize() / exact.repeat_interleave(64).view(64, 640) * approx.repeat_interleave(64).view(64, 640);
        Assert.True((dq.Dequantize() - expected).abs().max().item<float>() <= 1e-6);
    }

    [Fact]
    public void Nf4LinearBackwardFlowsToInputAsTheDequantisedWeight()
    {
        using var scope = NewDisposeScope();
        manual_seed(4);
        var o = new ModelOptions();
        var layer = new Linear(64, 32, false, o);
        using (no_grad()) layer.weight.copy_(randn(32, 64) * 0.1f);
        layer.AddLora(4, 8, 0, ScalarType.Float32);
        using (no_grad()) layer.lora_B!.weight.copy_(randn(32, 4) * 0.1f);
        var q = Nf4.QuantizeLinear(layer);
        Assert.Equal(0, layer.weight.numel());
        var dense = q.Dequantize();

        var x = randn(3, 5, 64).requires_grad_(true);
        var y = layer.forward(x);
        var g = randn(3, 5, 32);
        y.backward([g]);
        BackwardScratch.Release();

        var x2 = x.detach().clone().requires_grad_(true);
        var a = layer.lora_A!.weight.detach().clone().requires_grad_(true);
        var b = layer.lora_B.weight.detach().clone().requires_grad_(true);
        var y2 = nn.functional.linear(x2, dense) + nn.functional.linear(nn.functional.linear(x2, a), b) * 2.0;
        y2.backward([g]);
        Assert.True((y - y2).abs().max().item<float>() <= 1e-5);
        Assert.True((x.grad! - x2.grad!).abs().max().item<float>() <= 1e-5);
        Assert.True((layer.lora_A.weight.grad! - a.grad!).abs().max().item<float>() <= 1e-5);
        Assert.True((layer.lora_B.weight.grad! - b.grad!).abs().max().item<float>() <= 1e-5);
    }

    /// <summary>VLMTUNE_NF4_KERNEL=0 (<see cref="RuntimeSwitches.Nf4Kernel"/>) travels with every weight QLoRA quantises.</summary>
    [Fact]
    public void KernelSwitchTravelsWithTheQuantisedWeights()
    {
        using var lm = new InternLM2ForCausalLM(VlmTune.Tests.Cuda.CudaLibraryTests.TinyConfig(), new ModelOptions());
        var off = Qlora.QuantizeLanguageModel(lm, cudaKernel: false);
        Assert.NotEmpty(off);
        Assert.All(off, w => Assert.False(w.Weight.CudaKernel));
        foreach (var (_, w) in off) w.Dispose();
        using var layer = new Linear(64, 32, false, new ModelOptions());
        using var single = Nf4.QuantizeLinear(layer);
        Assert.True(single.CudaKernel);   // on unless switched off
    }

    [FixtureFact]
    public void QloraLossIsWithinTwoPercentOfLora()
    {
        using var scope = NewDisposeScope();
        using var model = GoldenSample.FreshModel();
        PeftAdapter.Load(model.language_model, Fixtures.Adapter);
        var labels = tensor(GoldenSample.Labels).unsqueeze(0);
        double lora;
        using (no_grad()) lora = CausalLmLoss.Compute(GoldenSample.Hidden(model), labels, model.language_model.OutputHead).Loss.item<float>();

        int quantised = Qlora.QuantizeLanguageModel(model.language_model).Count;
        Assert.Equal(10, quantised);
        var (loss, _) = CausalLmLoss.Compute(GoldenSample.Hidden(model), labels, model.language_model.OutputHead);
        double qlora = loss.item<float>();
        Assert.True(Math.Abs(qlora - lora) / lora <= 0.02, $"QLoRA loss {qlora} vs LoRA {lora}");
        Assert.NotEqual(lora, qlora);
        loss.backward();
        BackwardScratch.Release();
        foreach (var (_, linear) in PeftAdapter.LoraLinears(model.language_model))
            Assert.True(linear.lora_A!.weight.grad!.abs().sum().item<float>() > 0);
    }

    [FixtureFact]
    public void QuantizedVisionTowerKeepsItsFeaturesWithinNf4Error()
    {
        using var scope = NewDisposeScope();
        using var model = GoldenSample.FreshModel();
        var pixels = Fixtures.GoldenTensors.Read("pixel_values.clot");
        Tensor reference, quantised;
        using (no_grad()) reference = model.ExtractFeatures(pixels);
        var weights = Qlora.QuantizeVisionModel(model.vision_model);
        // Every encoder layer's qkv, proj, fc1 and fc2; their full-precision storage freed.
        Assert.Equal(4 * model.vision_model.encoder.layers.Count, weights.Count);
        Assert.All(Linear.AllIn(model.vision_model.encoder), l => Assert.Equal(0, l.Linear.weight.numel()));
        using (no_grad()) quantised = model.ExtractFeatures(pixels);
        double relative = ((quantised - reference).norm() / reference.norm()).item<float>();
        Assert.True(relative is > 0 and < 0.1, $"relative feature error {relative}");
    }
}
