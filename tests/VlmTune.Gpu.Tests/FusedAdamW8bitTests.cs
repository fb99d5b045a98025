using TorchSharp;
using TorchSharp.Modules;
using VlmTune.Data;
using VlmTune.Gpu.Tests.Support;
using VlmTune.Training;
using static TorchSharp.torch;

namespace VlmTune.Gpu.Tests;

/// <summary>
/// The 8-bit AdamW kernel (adamw8bit_step in Cuda/Kernels/adamw.cu through Training/FusedAdamW8bit.cs) against the
/// tensor-op reference (<see cref="AdamW8bit.Step"/>) on the CPU, from the same gradients and clip coefficient: codes,
/// absmax, fp32 moments and parameters are bit-identical over steps with a changing learning rate, clipping on and
/// off, on 8-bit tensors that end mid-block, span chunks or have an all-zero gradient, and on small tensors with fp32
/// moments. Identical, not close: both take the same IEEE operations in the same order (no fma, IEEE division and
/// square root, the same binary search with the same midpoints), so any difference is a bug in one of them, not a
/// rounding tie. A non-finite gradient leaves everything untouched; the trainer's optimizer gives the same state with
/// the kernel on and off (then libtorch's ops on the GPU).
/// </summary>
[Trait("Category", "Gpu")]
public class FusedAdamW8bitTests
{
    private const double Beta1 = 0.9, Beta2 = 0.999, Eps = 1e-8, WeightDecay = 0.05;

    // fp32 moments: one value, odd, one short of min_8bit_size. 8-bit: exactly min_8bit_size (16 blocks), one more (a
    // partial block), a chunk and a partial block, LoRA A and B shapes, several chunks ending mid-block; the last one
    // gets a zero gradient (all-zero blocks: absmax 0).
    private static readonly long[][] Shapes = [[1], [7], [4095], [4096], [4097], [FusedAdamW.ChunkElements + 300], [128, 2048], [2048, 128], [3, 100_003], [64, 256]];
    private static int ZeroGradient => Shapes.Length - 1;

    [GpuTheory]
    [InlineData(0.01)]    // the gradients' norm is far above: clipped every step
    [InlineData(1e9)]     // never clipped
    public void KernelGivesTheCpuReferencesCodesAbsmaxAndParametersBitForBit(double maxNorm)
    {
        using var scope = NewDisposeScope();
        var cpu = Parameters(seed: 1);
        var cuda = cpu.Select(p => new Parameter(p.detach().to(TestDevice.Cuda), requires_grad: true)).ToList();
        using var reference = new AdamW8bit(cpu, 1e-3, Beta1, Beta2, Eps, WeightDecay);
        using var adam8 = new AdamW8bit(cuda, 1e-3, Beta1, Beta2, Eps, WeightDecay);
        Assert.Equal(new[] { false, false, false, true, true, true, true, true, true, true }, adam8.States.Select(s => s.Blockwise));
        using var kernel = FusedAdamW8bit.TryCreate(adam8, out var whyNot);
        Assert.True(kernel is not null, $"the fused 8-bit AdamW did not load: {whyNot}");

        for (int step = 1; step <= 6; step++)
        {
            double lr = 1e-3 * (1 + 0.5 * Math.Sin(step));    // as a schedule changes it
            reference.LearningRate = adam8.LearningRate = lr;
            double expectedNorm = SetGradients(cpu, cuda, seed: 100 + step);
            double norm = kernel.Step(cuda, maxNorm);
            Assert.True(Math.Abs(norm - expectedNorm) <= 1e-5 * expectedNorm, $"step {step}: norm {norm} vs {expectedNorm}");
            // The kernel's coefficient: fp32 max_norm / (norm + 1e-6), at most 1 (grad_norm_finish).
            float coefficient = Math.Min((float)maxNorm / ((float)norm + 1e-6f), 1f);
            reference.Step(coefficient);
            reference.ZeroGrad();
            Assert.Equal(reference.Steps, adam8.Steps);
            for (int i = 0; i < Shapes.Length; i++)
            {
                string what = $"step {step}, tensor {i} ({string.Join('x', Shapes[i])}), max_norm {maxNorm}";
                var (want, got) = (reference.States[i], adam8.States[i]);
                AssertIdentical(want.Param, got.Param, $"{what}: parameter");
                AssertIdentical(want.State1, got.State1, $"{what}: {(want.Blockwise ? "first moment's codes" : "exp_avg")}");
                AssertIdentical(want.State2, got.State2, $"{what}: {(want.Blockwise ? "second moment's codes" : "exp_avg_sq")}");
                if (want.Blockwise)
                {
                    AssertIdentical(want.Absmax1!, got.Absmax1!, $"{what}: first moment's absmax");
                    AssertIdentical(want.Absmax2!, got.Absmax2!, $"{what}: second moment's absmax");
                }
                using var grad = cuda[i].grad!;
                Assert.True(grad.count_nonzero().item<long>() == 0, $"{what}: the kernel left the gradient non-zero");
            }
            using var zeroBlocks = adam8.States[ZeroGradient].Absmax1!.count_nonzero();
            Assert.True(zeroBlocks.item<long>() == 0, "the zero-gradient tensor's first moment has a non-zero absmax");
        }
    }

    [GpuFact]
    public void ANonFiniteGradientLeavesParametersStatesStepsAndGradientsUntouched()
    {
        using var scope = NewDisposeScope();
        var cpu = Parameters(seed: 2);
        var cuda = cpu.Select(p => new Parameter(p.detach().to(TestDevice.Cuda), requires_grad: true)).ToList();
        using var adam8 = new AdamW8bit(cuda, 1e-3, Beta1, Beta2, Eps, WeightDecay);
        using var kernel = FusedAdamW8bit.TryCreate(adam8, out var whyNot);
        Assert.True(kernel is not null, $"the fused 8-bit AdamW did not load: {whyNot}");
        SetGradients(cpu, cuda, seed: 3);
        Assert.True(double.IsFinite(kernel.Step(cuda, 1.0)));

        SetGradients(cpu, cuda, seed: 4);
        using (no_grad())
        using (var g = cuda[6].grad!)
            g[5, 17] = float.PositiveInfinity;
        var before = adam8.States.Select(s => new[] { s.Param, s.State1, s.State2, s.Absmax1, s.Absmax2 }.Select(t => t?.clone()).ToList()).ToList();
        var grads = cuda.Select(p => { using var g = p.grad!; return g.clone(); }).ToList();

        double norm = kernel.Step(cuda, 1.0);

        Assert.False(double.IsFinite(norm), $"norm {norm} with an infinite gradient");
        Assert.Equal(1, adam8.Steps);
        for (int i = 0; i < Shapes.Length; i++)
        {
            var s = adam8.States[i];
            var now = new[] { s.Param, s.State1, s.State2, s.Absmax1, s.Absmax2 };
            for (int k = 0; k < now.Length; k++)
                if (now[k] is { } t) AssertIdentical(before[i][k]!, t, $"tensor {i}, part {k} moved");
            using var g = cuda[i].grad!;
            AssertIdentical(grads[i].nan_to_num(), g.nan_to_num(), $"tensor {i}: gradient changed");
        }
    }

    [GpuFact]
    public void TheTrainersOptimizerGivesTheSameStateWithTheKernelOnAndOff()
    {
        using var scope = NewDisposeScope();
        // No clipping (max_norm far above): both paths then scale by exactly 1 (the kernel's norm and libtorch's differ
        // in their last bits, so with clipping their coefficients could too).
        var config = new TrainConfig { Model = "unused", Lr = 2e-4, MaxNorm = 1e9, WeightDecay = 0.05, Optim = "adamw_8bit" };
        var on = Parameters(seed: 5).Select(p => new Parameter(p.detach().to(TestDevice.Cuda), requires_grad: true)).ToList();
        var off = on.Select(p => new Parameter(p.detach().clone(), requires_grad: true)).ToList();
        using var fused = new TrainingOptimizer(config, on.Select((p, i) => ($"t{i}", p)).ToList(), dp: null, rank: 0, _ => { }, fusedKernel: true);
        using var plain = new TrainingOptimizer(config, off.Select((p, i) => ($"t{i}", p)).ToList(), dp: null, rank: 0, _ => { }, fusedKernel: false);
        Assert.True(fused.Fused, "the trainer's optimizer did not take the fused 8-bit step on CUDA");
        Assert.False(plain.Fused);
        Assert.Equal(plain.StateBytes, fused.StateBytes);
        fused.SetLearningRate(config.Lr);
        plain.SetLearningRate(config.Lr);
        var counters = new DataCounters();
        var host = Parameters(seed: 5);
        for (int step = 0; step < 4; step++)
        {
            SetGradients(host, on, seed: 10 + step);
            SetGradients(host, off, seed: 10 + step);
            double a = fused.Step(step, ["s"], counters, _ => { }), b = plain.Step(step, ["s"], counters, _ => { });
            Assert.True(Math.Abs(a - b) <= 1e-5 * b, $"step {step}: norm {a} vs {b}");
        }
        Assert.Equal(plain.Steps, fused.Steps);
        for (int i = 0; i < Shapes.Length; i++)
        {
            var (want, got) = (plain.EightBit!.States[i], fused.EightBit!.States[i]);
            AssertIdentical(want.Param, got.Param, $"tensor {i}: master");
            AssertIdentical(want.State1, got.State1, $"tensor {i}: first moment");
            AssertIdentical(want.State2, got.State2, $"tensor {i}: second moment");
            if (want.Blockwise) AssertIdentical(want.Absmax1!, got.Absmax1!, $"tensor {i}: absmax");
        }
    }

    private static List<Parameter> Parameters(int seed)
    {
        using var gen = new Generator((ulong)seed);
        return Shapes.Select(s => new Parameter(randn(s, generator: gen), requires_grad: true)).ToList();
    }

    /// <summary>The same random gradients (scaled differently per tensor; the last one zero) on both lists; returns their global norm.</summary>
    private static double SetGradients(List<Parameter> host, List<Parameter> device, int seed)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        using var gen = new Generator((ulong)seed);
        double sumSq = 0;
        for (int i = 0; i < host.Count; i++)
        {
            var g = i == ZeroGradient ? zeros(host[i].shape) : randn(host[i].shape, generator: gen) * (0.1f * (i + 1));
            sumSq += g.to_type(ScalarType.Float64).pow(2).sum().item<double>();
            SetGradient(host[i], g);
            SetGradient(device[i], g.to(device[i].device));
        }
        return Math.Sqrt(sumSq);
    }

    private static void SetGradient(Parameter p, Tensor g)
    {
        using var current = p.grad;
        if (current is null) p.grad = g.clone().DetachFromDisposeScope();
        else current.copy_(g);
    }

    /// <summary>Equal bit for bit (compared as raw bytes on the host), else how many elements differ and by how much.</summary>
    private static void AssertIdentical(Tensor expected, Tensor actual, string what)
    {
        using var scope = NewDisposeScope();
        var a = expected.cpu().contiguous();
        var b = actual.cpu().contiguous();
        Assert.Equal(a.dtype, b.dtype);
        if (a.bytes.SequenceEqual(b.bytes)) return;
        var wide = (b.to_type(ScalarType.Float64) - a.to_type(ScalarType.Float64)).abs();
        Assert.Fail($"{what}: {wide.gt(0).sum().item<long>()} of {a.numel()} elements differ, by up to {wide.max().item<double>():g4} " +
                    $"(largest value {a.to_type(ScalarType.Float64).abs().max().item<double>():g4})");
    }
}
