using TorchSharp;
using TorchSharp.Modules;
using VlmTune.Data;
using VlmTune.Gpu.Tests.Support;
using VlmTune.Training;
using static TorchSharp.torch;

namespace VlmTune.Gpu.Tests;

/// <summary>
/// The multi-tensor optimizer step (Cuda/Kernels/adamw.cu through Training/FusedAdamW.cs) against what it replaces,
/// libtorch's clip_grad_norm_ and TorchSharp's AdamW, on the same GPU from the same gradients: parameters, moments,
/// step counts and the returned norm agree to fp32 rounding over steps with a changing learning rate, with clipping
/// on and off, on tensors that end mid-chunk, span several chunks or hold one value; a non-finite gradient leaves
/// everything untouched; and the trainer's optimizer gives the same masters with the kernels on and off.
/// </summary>
[Trait("Category", "Gpu")]
public class FusedAdamWTests
{
    private const double Beta1 = 0.9, Beta2 = 0.999, Eps = 1e-8, WeightDecay = 0.05;

    // One value; odd; exactly one chunk; one chunk and one value; LoRA A and B shapes; several chunks ending mid-chunk.
    private static readonly long[][] Shapes = [[1], [7], [FusedAdamW.ChunkElements], [FusedAdamW.ChunkElements + 1], [128, 2048], [2048, 128], [3, 100_003]];

    [GpuTheory]
    [InlineData(0.01)]    // the gradients' norm is far above: clipped every step
    [InlineData(1e9)]     // never clipped
    public void StepsMatchTorchSharpAdamWAfterLibtorchClipping(double maxNorm)
    {
        using var scope = NewDisposeScope();
        var reference = Parameters(seed: 1);
        var fused = reference.Select(p => new Parameter(p.detach().clone(), requires_grad: true)).ToList();
        var initial = reference.Select(p => p.detach().clone()).ToList();
        using var referenceAdam = optim.AdamW(reference, 1e-3, Beta1, Beta2, Eps, WeightDecay);
        using var fusedAdam = optim.AdamW(fused, 1e-3, Beta1, Beta2, Eps, WeightDecay);
        using var kernel = FusedAdamW.TryCreate(fusedAdam, fused, Beta1, Beta2, Eps, WeightDecay, out var whyNot);
        Assert.True(kernel is not null, $"the fused AdamW did not load: {whyNot}");

        var generator = new Random(7);
        for (int step = 1; step <= 6; step++)
        {
            double lr = 1e-3 * (1 + 0.5 * Math.Sin(step));    // as a schedule changes it
            foreach (var g in referenceAdam.ParamGroups) g.LearningRate = lr;
            SetGradients(reference, fused, seed: generator.Next());
            double expectedNorm = nn.utils.clip_grad_norm_(reference, maxNorm);
            referenceAdam.step();
            referenceAdam.zero_grad();
            double norm = kernel.Step(fused, lr, maxNorm);

            Assert.True(Math.Abs(norm - expectedNorm) <= 1e-5 * expectedNorm, $"step {step}: norm {norm} vs libtorch's {expectedNorm}");
            var referenceStates = referenceAdam.state_dict().State.Cast<AdamW.State>().ToList();
            var fusedStates = fusedAdam.state_dict().State.Cast<AdamW.State>().ToList();
            for (int i = 0; i < reference.Count; i++)
            {
                string what = $"step {step}, tensor {i} ({string.Join('x', reference[i].shape)}), max_norm {maxNorm}";
                Assert.Equal(referenceStates[i].step, fusedStates[i].step);
                AssertSameUpdate(initial[i], reference[i], fused[i], $"{what}: parameter");
                AssertClose(referenceStates[i].exp_avg, fusedStates[i].exp_avg, $"{what}: exp_avg");
                AssertClose(referenceStates[i].exp_avg_sq, fusedStates[i].exp_avg_sq, $"{what}: exp_avg_sq");
                using var grad = fused[i].grad!;
                Assert.True(grad.count_nonzero().item<long>() == 0, $"{what}: the kernel left the gradient non-zero");
            }
        }
    }

    [GpuFact]
    public void ANonFiniteGradientLeavesParametersMomentsAndStepsUntouched()
    {
        using var scope = NewDisposeScope();
        var parameters = Parameters(seed: 2);
        using var adam = optim.AdamW(parameters, 1e-3, Beta1, Beta2, Eps, WeightDecay);
        using var kernel = FusedAdamW.TryCreate(adam, parameters, Beta1, Beta2, Eps, WeightDecay, out var whyNot);
        Assert.True(kernel is not null, $"the fused AdamW did not load: {whyNot}");
        SetGradients(parameters, null, seed: 3);
        Assert.True(double.IsFinite(kernel.Step(parameters, 1e-3, 1.0)));

        SetGradients(parameters, null, seed: 4);
        using (no_grad())
        using (var g = parameters[4].grad!)
            g[5, 17] = float.PositiveInfinity;
        var before = parameters.Select(p => p.detach().clone()).ToList();
        var states = adam.state_dict().State.Cast<AdamW.State>().ToList();
        var moments = states.Select(s => (s.exp_avg.clone(), s.exp_avg_sq.clone())).ToList();
        var grads = parameters.Select(p => { using var g = p.grad!; return g.clone(); }).ToList();

        double norm = kernel.Step(parameters, 1e-3, 1.0);

        Assert.False(double.IsFinite(norm), $"norm {norm} with an infinite gradient");
        for (int i = 0; i < parameters.Count; i++)
        {
            Assert.True(Same(parameters[i], before[i]), $"tensor {i} moved");
            Assert.True(Same(states[i].exp_avg, moments[i].Item1) && Same(states[i].exp_avg_sq, moments[i].Item2), $"tensor {i}: moments moved");
            Assert.Equal(1, states[i].step);
            using var g = parameters[i].grad!;
            Assert.True(Same(g.nan_to_num(), grads[i].nan_to_num()), $"tensor {i}: gradient changed");
        }
    }

    [GpuFact]
    public void TheTrainersOptimizerGivesTheSameMastersWithTheKernelsOnAndOff()
    {
        using var scope = NewDisposeScope();
        var config = new TrainConfig { Model = "unused", Lr = 2e-4, MaxNorm = 0.5, WeightDecay = 0.05 };
        var on = Parameters(seed: 5);
        var off = on.Select(p => new Parameter(p.detach().clone(), requires_grad: true)).ToList();
        using var fused = new TrainingOptimizer(config, on.Select((p, i) => ($"t{i}", p)).ToList(), dp: null, rank: 0, _ => { }, fusedKernel: true);
        using var plain = new TrainingOptimizer(config, off.Select((p, i) => ($"t{i}", p)).ToList(), dp: null, rank: 0, _ => { }, fusedKernel: false);
        Assert.True(fused.Fused, "the trainer's optimizer did not take the fused step on CUDA");
        Assert.False(plain.Fused);
        fused.SetLearningRate(config.Lr);
        plain.SetLearningRate(config.Lr);
        var counters = new DataCounters();
        for (int step = 0; step < 4; step++)
        {
            SetGradients(on, off, seed: 10 + step);
            double a = fused.Step(step, ["s"], counters, _ => { }), b = plain.Step(step, ["s"], counters, _ => { });
            Assert.True(Math.Abs(a - b) <= 1e-5 * b, $"step {step}: norm {a} vs {b}");
        }
        Assert.Equal(plain.Steps, fused.Steps);
        var initial = Parameters(seed: 5);
        var masters = fused.Masters();
        foreach (var (name, master) in plain.Masters())
            AssertSameUpdate(initial[int.Parse(name[1..])], master, masters[name], $"master {name}");
    }

    /// <summary>
    /// Which gradients the kernels take: under ZeRO-1 the norm also covers other ranks' model gradients, and a bf16 one
    /// sends that step down TorchSharp's path (TrainingOptimizer asks <see cref="FusedAdamW.Accepts"/> for each).
    /// </summary>
    [GpuFact]
    public void AcceptsContiguousFp32CudaGradientsOnly()
    {
        using var scope = NewDisposeScope();
        Parameter With(Tensor value, Tensor? grad)
        {
            var p = new Parameter(value, requires_grad: true);
            if (grad is not null) p.grad = grad;
            return p;
        }
        Assert.True(FusedAdamW.Accepts(With(zeros(4, 8, device: TestDevice.Cuda), zeros(4, 8, device: TestDevice.Cuda))));
        Assert.False(FusedAdamW.Accepts(With(zeros(4, 8, device: TestDevice.Cuda), null)), "no gradient");
        Assert.False(FusedAdamW.Accepts(With(zeros(4, 8, ScalarType.BFloat16, TestDevice.Cuda), zeros(4, 8, ScalarType.BFloat16, TestDevice.Cuda))), "bf16");
        Assert.False(FusedAdamW.Accepts(With(zeros(4, 8), zeros(4, 8))), "on the CPU");
        Assert.False(FusedAdamW.Accepts(With(zeros(8, 4, device: TestDevice.Cuda).t(), zeros(8, 4, device: TestDevice.Cuda).t())), "not contiguous");
    }

    private static bool Same(Tensor a, Tensor b)
    {
        using var equal = a.eq(b).all();
        return equal.item<bool>();
    }

    private static List<Parameter> Parameters(int seed)
    {
        manual_seed(seed);
        return Shapes.Select(s => new Parameter(randn(s, ScalarType.Float32, TestDevice.Cuda), requires_grad: true)).ToList();
    }

    /// <summary>The same random gradients (scaled differently per tensor) on both lists.</summary>
    private static void SetGradients(List<Parameter> a, List<Parameter>? b, int seed)
    {
        using var noGrad = no_grad();
        manual_seed(seed);
        for (int i = 0; i < a.Count; i++)
        {
            var g = (randn(a[i].shape, ScalarType.Float32, TestDevice.Cuda) * (0.1 * (i + 1))).DetachFromDisposeScope();
            if (b is not null) SetGradient(b[i], g.clone().DetachFromDisposeScope());
            SetGradient(a[i], g);
        }
    }

    private static void SetGradient(Parameter p, Tensor g)
    {
        using var current = p.grad;
        if (current is null) p.grad = g;
        else { current.copy_(g); g.Dispose(); }
    }

    /// <summary>
    /// The same change from <paramref name="initial"/> up to fp32 rounding: 1e-3 of the largest change (any slip in the
    /// update's formula is larger) plus a few ulps of the values themselves, which each step rounds.
    /// </summary>
    private static void AssertSameUpdate(Tensor initial, Tensor expected, Tensor actual, string what)
    {
        using var scope = NewDisposeScope();
        double change = (expected - initial).abs().max().item<float>();
        double scale = expected.abs().max().item<float>();
        double diff = (expected - actual).abs().max().item<float>();
        Assert.True(change > 0, $"{what}: the reference did not move");
        Assert.True(diff <= 1e-3 * change + 1e-6 * scale, $"{what}: max |Δ| {diff:g3} for a change of {change:g3} (largest value {scale:g3})");
    }

    /// <summary>Equal up to fp32 rounding of a few operations: 1e-5 relative to the tensor's largest value, plus 1e-12.</summary>
    private static void AssertClose(Tensor expected, Tensor actual, string what)
    {
        using var scope = NewDisposeScope();
        double scale = expected.abs().max().item<float>();
        double diff = (expected - actual).abs().max().item<float>();
        Assert.True(diff <= 1e-5 * scale + 1e-12, $"{what}: max |Δ| {diff:g3} (largest value {scale:g3})");
    }
}
