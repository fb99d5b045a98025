using System.Runtime.InteropServices;
using VlmTune.Gpu.Tests.Support;
using VlmTune.Models;
using VlmTune.Quantization;
using static TorchSharp.torch;

namespace VlmTune.Gpu.Tests;

/// <summary>
/// The NF4 dequantisation kernel (Cuda/Kernels/nf4.cu) against the tensor-op path (Nf4Tensor.DequantizeWithTensorOps)
/// on the CPU and on CUDA: the kernel promises the same bits, so the check is exact, on shapes that end mid-byte,
/// mid-block (64 values) and mid-statistics-block (256 blocks), with and without double quantisation, for bf16 and
/// fp32 outputs; then a QLoRA linear layer's forward and backward against the dequantised weight.
/// </summary>
[Trait("Category", "Gpu")]
public class Nf4KernelTests
{
    public static TheoryData<int, int, bool> Shapes()
    {
        var data = new TheoryData<int, int, bool>();
        foreach (bool doubleQuant in new[] { false, true })
        {
            data.Add(1, 1, doubleQuant);         // one value: half a byte, a block of 1
            data.Add(3, 5, doubleQuant);         // 15: odd, the last byte half used
            data.Add(1, 64, doubleQuant);        // exactly one block
            data.Add(1, 65, doubleQuant);        // one block and one value
            data.Add(127, 129, doubleQuant);     // 16,383: odd, 256 blocks (one full statistics block), the last short by one
            data.Add(64, 257, doubleQuant);      // 257 blocks: a second statistics block holding one
            data.Add(4099, 1537, doubleQuant);   // 6.3 M, odd both ways: 384 statistics blocks, the last partial
            data.Add(2048, 2048, doubleQuant);   // an aligned LLM-sized weight
        }
        return data;
    }

    [GpuTheory]
    [MemberData(nameof(Shapes))]
    public void KernelDequantisesToTheTensorOpsBits(int rows, int cols, bool doubleQuant)
    {
        using var scope = NewDisposeScope();
        var weight = Weight(rows, cols);
        using var onCpu = Nf4.Quantize(weight, doubleQuant);
        using var onGpu = new Nf4Tensor
        {
            Packed = onCpu.Packed.to(TestDevice.Cuda), Absmax = onCpu.Absmax.to(TestDevice.Cuda), Absmax2 = onCpu.Absmax2?.to(TestDevice.Cuda),
            Offset = onCpu.Offset, Shape = onCpu.Shape, DType = onCpu.DType,
        };
        foreach (var dtype in new[] { ScalarType.BFloat16, ScalarType.Float32 })
        {
            var kernel = Nf4CudaDequantizer.TryDequantize(onGpu, dtype);
            Assert.True(kernel is not null, $"the NF4 kernel did not run: {Nf4CudaDequantizer.Unavailable ?? $"{RuntimeSwitches.Nf4KernelVariable} is off"}");
            Assert.Equal(onCpu.Shape, kernel.shape);
            Assert.Equal(dtype, kernel.dtype);
            AssertSameBits(onGpu.DequantizeWithTensorOps(dtype), kernel, $"CUDA tensor ops, {dtype}");
            AssertSameBits(onCpu.DequantizeWithTensorOps(dtype), kernel, $"CPU tensor ops, {dtype}");
        }
    }

    [GpuTheory]
    [InlineData(64, 96)]
    [InlineData(1537, 4099)]
    [InlineData(2048, 5632)]
    public void QuantisedLinearComputesWithTheDequantisedWeight(int inFeatures, int outFeatures) =>
        CheckQuantisedLinear(TestDevice.Cuda, inFeatures, outFeatures);

    /// <summary>The body of the test above, on any device (the CPU exercises everything but the kernel).</summary>
    internal static void CheckQuantisedLinear(Device device, int inFeatures, int outFeatures)
    {
        using var scope = NewDisposeScope();
        var options = new ModelOptions { Device = device, DType = ScalarType.BFloat16 };
        using var linear = new Linear(inFeatures, outFeatures, false, options);
        using (no_grad()) linear.weight.copy_(Weight(outFeatures, inFeatures));
        using var q = Nf4.QuantizeLinear(linear);
        var w = q.DequantizeWithTensorOps(ScalarType.BFloat16);                                      // (out, in), the reference
        random.manual_seed(7);
        var x = randn(new long[] { 2, 7, inFeatures }).to(ScalarType.BFloat16).to(device).requires_grad_(true);
        var y = linear.forward(x);                                                                   // (2, 7, out)
        Tensor expected;
        using (no_grad()) expected = nn.functional.linear(x.detach(), w);
        // The weights are the same bits (above) and it is one cuBLAS product either way; allow one bf16 ulp of the
        // largest output in case another call picks another algorithm.
        AssertClose(expected, y, 1, "forward");

        var gradOut = randn(y.shape).to(ScalarType.BFloat16).to(device);
        y.backward([gradOut]);
        Tensor expectedGrad;
        using (no_grad()) expectedGrad = matmul(gradOut, w);                                        // (2, 7, in)
        AssertClose(expectedGrad, x.grad!, 1, "input gradient");
        Assert.False(linear.weight.requires_grad);   // the frozen base takes no gradient
    }

    /// <summary>N(0, 0.02²) weights with an all-zero first block (absmax 0: every value 0) and a few outliers.</summary>
    internal static Tensor Weight(int rows, int cols)
    {
        random.manual_seed(rows * 7919L + cols);
        var w = randn(rows, cols) * 0.02;
        var flat = w.view(-1);
        if (flat.shape[0] >= 128) flat[..64] = zeros(64);
        if (flat.shape[0] >= 1000) flat.index_copy_(0, tensor(new long[] { 100, 500, 999 }), tensor(new[] { 0.5f, -0.9f, 0.3f }));
        return w;
    }

    /// <summary>Bit for bit, −0 and NaN payloads included (bf16 → fp32 is exact).</summary>
    internal static void AssertSameBits(Tensor expected, Tensor actual, string what)
    {
        using var scope = NewDisposeScope();
        var e = MemoryMarshal.Cast<float, int>(expected.to_type(ScalarType.Float32).cpu().contiguous().data<float>().ToArray()).ToArray();
        var a = MemoryMarshal.Cast<float, int>(actual.to_type(ScalarType.Float32).cpu().contiguous().data<float>().ToArray()).ToArray();
        Assert.Equal(e.Length, a.Length);
        var differing = Enumerable.Range(0, e.Length).Where(i => e[i] != a[i]).ToList();
        Assert.True(differing.Count == 0,
            $"{what}: {differing.Count} of {e.Length} values differ, first at " +
            string.Join(", ", differing.Take(5).Select(i => $"[{i}] {BitConverter.Int32BitsToSingle(e[i]):g9} vs {BitConverter.Int32BitsToSingle(a[i]):g9}")));
    }

    private static void AssertClose(Tensor expected, Tensor actual, double ulps, string what)
    {
        using var scope = NewDisposeScope();
        var e = expected.to_type(ScalarType.Float32);
        var a = actual.to_type(ScalarType.Float32);
        double maxAbs = e.abs().max().item<float>(), diff = (e - a).abs().max().item<float>();
        double tol = ulps * LogitTolerance.Bf16Ulp(maxAbs);
        Assert.True(diff <= tol, $"{what}: max |diff| {diff:g4} > {tol:g4} ({ulps} bf16 ulp of max {maxAbs:g4})");
    }
}
