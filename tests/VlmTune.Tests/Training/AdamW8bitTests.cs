using TorchSharp;
using TorchSharp.Modules;
using VlmTune.Data;
using VlmTune.Quantization;
using VlmTune.Training;
using static TorchSharp.torch;

namespace VlmTune.Tests.Training;

/// <summary>
/// optim: adamw_8bit (<see cref="AdamW8bit"/>, the CPU / tensor-op reference): bitsandbytes' two dynamic maps, the
/// block-wise round trip, the update's arithmetic, how closely it follows fp32 AdamW, which tensors stay fp32, the
/// state's size, exact resumption, the non-finite skip and the refusal of the other optimizer's checkpoint.
/// </summary>
public sealed class AdamW8bitTests
{
    private const double Beta1 = 0.9, Beta2 = 0.999, Eps = 1e-8, WeightDecay = 0.05;

    private static float Bits(uint bits) => BitConverter.UInt32BitsToSingle(bits);

    [Fact]
    public void TheMapsAreBitsandbytesCreateDynamicMapSignedAndUnsigned()
    {
        // Entries of bitsandbytes' create_dynamic_map(signed) computed independently from functional.py's formula
        // in fp32 (torch.linspace's start + step·i / end − step·(steps−1−i), the means, fp32(10^k) × mean).
        var signed = Nf4.DynamicMap(signed: true).data<float>().ToArray();
        var unsigned = Nf4.DynamicMap(signed: false).data<float>().ToArray();
        Assert.Equal(256, signed.Length);
        Assert.Equal(256, unsigned.Length);
        Assert.True(signed.Zip(signed.Skip(1)).All(p => p.First < p.Second), "signed: strictly increasing");
        Assert.True(unsigned.Zip(unsigned.Skip(1)).All(p => p.First < p.Second), "unsigned: strictly increasing");
        (int Index, uint Bits)[] expectedSigned =
        [
            (0, 0xbf7e3333), (1, 0xbf7a999a), (2, 0xbf770000), (63, 0xbddb3334), (100, 0xbbf4bc6a), (126, 0xb513a3b7),
            (127, 0x00000000), (128, 0x3513a3b7), (129, 0x365a1a94), (191, 0x3ddb3334), (200, 0x3e6f3333), (253, 0x3f7a999a),
            (254, 0x3f7e3333), (255, 0x3f800000),
        ];
        (int Index, uint Bits)[] expectedUnsigned =
        [
            (0, 0x00000000), (1, 0x34ae7baa), (2, 0x35500998), (63, 0x3c2f5c2a), (100, 0x3d807ae2), (126, 0x3dcb5c29),
            (127, 0x3dd40000), (128, 0x3de26666), (129, 0x3df0cccd), (191, 0x3f0db334), (200, 0x3f1de666), (253, 0x3f7d4ccc),
            (254, 0x3f7f199a), (255, 0x3f800000),
        ];
        foreach (var (i, bits) in expectedSigned) Assert.True(signed[i] == Bits(bits), $"signed[{i}] = {signed[i]:R}, bitsandbytes {Bits(bits):R}");
        foreach (var (i, bits) in expectedUnsigned) Assert.True(unsigned[i] == Bits(bits), $"unsigned[{i}] = {unsigned[i]:R}, bitsandbytes {Bits(bits):R}");
        Assert.Equal(127, signed.Count(v => v < 0));                // 1 + 2 + … + 64 means per sign, then 0 and 1
        Assert.Equal(AdamW8bit.SignedZeroCode, Array.IndexOf(signed, 0f));
        Assert.Equal(0.99296875f, -signed[0]);                       // the signed map reaches −0.993, not −1
        Assert.Equal(0.325e-6f, unsigned[1], 1e-12f);                // 1e-6 × the first mean of linspace(0.1, 1, 3)
    }

    public static TheoryData<bool> Signs => new() { true, false };

    [Theory]
    [MemberData(nameof(Signs))]
    public void BlockwiseRoundTripPicksTheNearestCodeOfEachBlocksAbsmax(bool signed)
    {
        using var scope = NewDisposeScope();
        using var gen = new Generator(11);
        // 39 full blocks and a partial one; each block at its own scale (1e-6 … 10), as moments of different rows are.
        const int n = 10_000;
        var scales = tensor(Enumerable.Range(0, n).Select(i => MathF.Pow(10, i / AdamW8bit.BlockSize % 8 - 6)).ToArray());
        var x = randn([n], generator: gen) * scales;
        if (!signed) x = x.abs();
        var map = Nf4.DynamicMap(signed: signed);
        var (codes, absmax) = AdamW8bit.QuantizeBlockwise(x, map, signed);
        Assert.Equal(ScalarType.Byte, codes.dtype);
        Assert.Equal(AdamW8bit.Blocks(n), absmax.numel());
        var back = AdamW8bit.DequantizeBlockwise(codes, absmax, map).data<float>().ToArray();
        var xs = x.data<float>().ToArray();
        var a = absmax.data<float>().ToArray();
        var m = map.data<float>().ToArray();
        var c = codes.data<byte>().ToArray();
        float halfGap = m.Zip(m.Skip(1)).Max(p => p.Second - p.First) / 2;   // 0.00703 of the absmax, near ±1
        for (int i = 0; i < n; i++)
        {
            int block = i / AdamW8bit.BlockSize;
            Assert.Equal(xs.Skip(block * AdamW8bit.BlockSize).Take(AdamW8bit.BlockSize).Max(Math.Abs), a[block]);
            float scaled = xs[i] / a[block];
            double nearest = m.Min(v => Math.Abs(v - scaled));
            Assert.True(Math.Abs(m[c[i]] - scaled) <= nearest + 6e-7, $"element {i}: {scaled} took code {c[i]} ({m[c[i]]})");   // 5.5e-7: the sign rule's step
            Assert.Equal(m[c[i]] * a[block], back[i]);
            Assert.True(Math.Abs(back[i] - xs[i]) <= halfGap * a[block] * 1.0001, $"element {i}: {back[i]} for {xs[i]} (absmax {a[block]})");
        }
    }

    [Fact]
    public void TheSignRuleKeepsANegativeMomentNegativeAndAZeroBlockKeepsTheZeroCodes()
    {
        using var scope = NewDisposeScope();
        var map = Nf4.DynamicMap(signed: true);
        var values = zeros(2 * AdamW8bit.BlockSize);
        values[0] = tensor(1f);
        values[1] = tensor(-1e-9f);   // nearest code: 0, which bitsandbytes moves to the smallest negative one
        values[2] = tensor(1e-9f);    // nearest code: 0, kept
        var (codes, absmax) = AdamW8bit.QuantizeBlockwise(values, map, signed: true);
        var c = codes.data<byte>().ToArray();
        Assert.Equal(new[] { (byte)255, (byte)(AdamW8bit.SignedZeroCode - 1), AdamW8bit.SignedZeroCode }, c[..3]);
        Assert.All(c[AdamW8bit.BlockSize..], code => Assert.Equal(AdamW8bit.SignedZeroCode, code));   // the second block is all zero
        Assert.Equal(new[] { 1f, 0f }, absmax.data<float>().ToArray());
    }

    [Fact]
    public void TheFirstStepIsBitsandbytesArithmeticWithTheDecayAfterTheUpdate()
    {
        using var scope = NewDisposeScope();
        using var gen = new Generator(5);
        var p = new Parameter(randn([4096], generator: gen), requires_grad: true);
        var g = randn([4096], generator: gen);
        var p0 = p.detach().clone().data<float>().ToArray();
        var gs = g.data<float>().ToArray();
        using var opt = new AdamW8bit([p], 1e-2, Beta1, Beta2, Eps, WeightDecay);
        p.grad = g.clone();
        opt.Step(clipCoefficient: 0.5f);
        var s = opt.States.Single();
        Assert.True(s.Blockwise);
        var after = p.detach().data<float>().ToArray();
        var m = AdamW8bit.DequantizeBlockwise(s.State1, s.Absmax1!, Nf4.DynamicMap(signed: true)).data<float>().ToArray();
        var v = AdamW8bit.DequantizeBlockwise(s.State2, s.Absmax2!, Nf4.DynamicMap(signed: false)).data<float>().ToArray();
        var absmax1 = s.Absmax1!.data<float>().ToArray();
        var absmax2 = s.Absmax2!.data<float>().ToArray();
        for (int i = 0; i < 4096; i++)
        {
            double gi = 0.5 * gs[i], mi = (1 - Beta1) * gi, vi = (1 - Beta2) * gi * gi;
            double c2 = Math.Sqrt(1 - Beta2), stepSize = -1e-2 * c2 / (1 - Beta1);
            double expected = (p0[i] + stepSize * mi / (Math.Sqrt(vi) + Eps * c2)) * (1 - 1e-2 * WeightDecay);
            Assert.True(Math.Abs(after[i] - expected) <= 1e-6 * Math.Abs(expected) + 1e-7, $"element {i}: {after[i]} vs {expected}");
            // Blocks of 256: the absmax is the block's largest |m|; each moment within half a code gap of it.
            double blockMax = Enumerable.Range(i / 256 * 256, 256).Max(j => Math.Abs((1 - Beta1) * 0.5 * gs[j]));
            Assert.True(Math.Abs(absmax1[i / 256] - blockMax) <= 1e-6 * blockMax);
            Assert.True(Math.Abs(m[i] - mi) <= 0.0071 * blockMax, $"element {i}: m {m[i]} vs {mi}");
            Assert.True(Math.Abs(v[i] - vi) <= 0.0036 * absmax2[i / 256] * 1.0001 + 1e-12, $"element {i}: v {v[i]} vs {vi}");
        }
        Assert.Equal(1, opt.Steps);
    }

    /// <summary>A least-squares fit: a 64×96 weight (8-bit states) and a 96 bias (fp32 states).</summary>
    private sealed class Problem
    {
        public readonly Tensor X, Y, W0, B0;
        public Problem()
        {
            using var gen = new Generator(3);
            X = randn([256, 64], generator: gen);
            Y = X.matmul(randn([64, 96], generator: gen)) + 0.1f * randn([256, 96], generator: gen);
            W0 = randn([64, 96], generator: gen) * 0.1f;
            B0 = zeros(96);
        }
        public List<Parameter> Fresh() => [new Parameter(W0.clone(), requires_grad: true), new Parameter(B0.clone(), requires_grad: true)];
        public double LossAndGradients(List<Parameter> ps)
        {
            using var scope = NewDisposeScope();
            foreach (var q in ps) { using var g = q.grad; g?.zero_(); }
            var loss = (X.matmul(ps[0]) + ps[1] - Y).pow(2).mean();
            loss.backward();
            return loss.item<float>();
        }
    }

    [Fact]
    public void EightBitStatesLowerALossAlongsideFp32AdamW()
    {
        using var scope = NewDisposeScope();
        var problem = new Problem();
        const double lr = 1e-2;
        var reference = problem.Fresh();
        var eightBit = problem.Fresh();
        var allFp32 = problem.Fresh();
        using var adam = optim.AdamW(reference, lr, Beta1, Beta2, Eps, WeightDecay);
        using var adam8 = new AdamW8bit(eightBit, lr, Beta1, Beta2, Eps, WeightDecay);
        using var adam32 = new AdamW8bit(allFp32, lr, Beta1, Beta2, Eps, WeightDecay, minBlockwiseSize: long.MaxValue);
        Assert.Equal(new[] { true, false }, adam8.States.Select(s => s.Blockwise));
        Assert.All(adam32.States, s => Assert.False(s.Blockwise));
        double first = 0, last8 = 0, last32 = 0, lastReference = 0, drift8 = 0, drift32 = 0;
        for (int step = 1; step <= 300; step++)
        {
            lastReference = problem.LossAndGradients(reference);
            last8 = problem.LossAndGradients(eightBit);
            last32 = problem.LossAndGradients(allFp32);
            if (step == 1) first = lastReference;
            adam.step();
            adam8.Step();
            adam32.Step();
            using var stepScope = NewDisposeScope();
            double moved = (reference[0] - problem.W0).norm().item<float>();
            drift8 = Math.Max(drift8, (eightBit[0] - reference[0]).norm().item<float>() / moved);
            drift32 = Math.Max(drift32, (allFp32[0] - reference[0]).abs().max().item<float>() / (reference[0] - problem.W0).abs().max().item<float>());
        }
        // The same arithmetic with fp32 moments (only the decay's place differs from torch's, by lr²·wd a step) follows
        // torch's AdamW to rounding. 8-bit moments: the weight stays within 5% of fp32 AdamW's path (Frobenius norm of
        // the difference over that of the change, at every step; it peaks near 4.3% at step 50), and the loss with it.
        Assert.True(drift32 < 1e-3, $"fp32 states: max |W - W_torch| reached {drift32:g3} of the change");
        Assert.True(drift8 < 0.05, $"8-bit states: |W - W_torch| reached {drift8:g3} of |W_torch - W0|");
        Assert.True(last8 < 0.02 * first, $"8-bit AdamW: loss {first} → {last8}");
        Assert.True(Math.Abs(last8 - lastReference) <= 0.05 * lastReference, $"final loss {last8} vs fp32 AdamW's {lastReference}");
        Assert.True(Math.Abs(last32 - lastReference) <= 5e-3 * lastReference, $"final loss {last32} (fp32 states) vs {lastReference}");
    }

    /// <summary>
    /// bitsandbytes' own comparison of its 8-bit Adam with torch's (tests/test_optim.py test_optimizer8bit, fp32, Adam:
    /// no weight decay): p = 0.1·randn, 50 steps of 0.01·randn gradients at lr 1e-3, and after each step fewer than 20
    /// dequantised moments outside atol 3e-3 + rtol 1e-3 of torch's, mean |Δp| &lt; 6e-5 and mean relative |Δp| &lt; 6e-4;
    /// then, as there, torch's parameter and moments are set to ours, so each step measures one update's error. Every
    /// tenth step also checks that a save and load gives the same state. (bitsandbytes uses 1024 × 4097; 64 × 4097
    /// keeps the blocks that straddle rows and the partial last one at a CPU test's cost.)
    /// </summary>
    [Theory]
    [InlineData(1024, 32)]
    [InlineData(64, 4097)]
    public void EightBitStatesPassBitsandbytesOwnComparisonWithTorchAdam(int rows, int columns)
    {
        using var scope = NewDisposeScope();
        using var gen = new Generator(17);
        var torchParam = new Parameter(randn([rows, columns], generator: gen) * 0.1f, requires_grad: true);
        var ours = new Parameter(torchParam.detach().clone(), requires_grad: true);
        using var torchAdam = optim.Adam([torchParam], 1e-3, 0.9, 0.999, 1e-8, 0);
        var adam8 = new AdamW8bit([ours], 1e-3, 0.9, 0.999, 1e-8, 0);
        var signed = Nf4.DynamicMap(signed: true);
        var unsigned = Nf4.DynamicMap(signed: false);
        try
        {
            for (int step = 1; step <= 50; step++)
            {
                using var stepScope = NewDisposeScope();
                var g = randn([rows, columns], generator: gen) * 0.01f;
                torchParam.grad = g.clone();
                ours.grad = g.clone();
                torchAdam.step();
                adam8.Step();
                var state = adam8.States.Single();
                Assert.True(state.Blockwise);
                var torchState = (Adam.State)torchAdam.state_dict().State.Single();
                var m = AdamW8bit.DequantizeBlockwise(state.State1, state.Absmax1!, signed).view(rows, columns);
                var v = AdamW8bit.DequantizeBlockwise(state.State2, state.Absmax2!, unsigned).view(rows, columns);
                long mFar = isclose(torchState.exp_avg, m, rtol: 1e-3, atol: 3e-3).logical_not().sum().item<long>();
                long vFar = isclose(torchState.exp_avg_sq, v, rtol: 1e-3, atol: 3e-3).logical_not().sum().item<long>();
                Assert.True(mFar < 20 && vFar < 20, $"step {step}: {mFar} first and {vFar} second moments outside bitsandbytes' tolerance");
                var err = (torchParam.detach() - ours.detach()).abs();
                double meanErr = err.mean().item<float>(), meanRel = (err / (torchParam.detach().abs() + 1e-9f)).mean().item<float>();
                Assert.True(meanErr < 6e-5 && meanRel < 6e-4, $"step {step}: mean |Δp| {meanErr:g3}, mean relative {meanRel:g3}");
                if (step % 10 == 0)
                {
                    byte[] saved = Serialized(adam8);
                    var reloaded = new AdamW8bit([ours], 1e-3, 0.9, 0.999, 1e-8, 0);
                    using (var reader = new BinaryReader(new MemoryStream(saved))) reloaded.Load(reader);
                    Assert.Equal(saved, Serialized(reloaded));
                    adam8.Dispose();
                    adam8 = reloaded;
                }
                // "The parameters diverge quickly. Here we keep them close together so we can test against the Adam error."
                using (no_grad())
                {
                    torchParam.copy_(ours);
                    torchState.exp_avg.copy_(m);
                    torchState.exp_avg_sq.copy_(v);
                }
            }
        }
        finally { adam8.Dispose(); }
    }

    [Fact]
    public void TensorsUnder4096ElementsKeepFp32StatesAndTheRestTakeTwoBytesAParameterPlusTheAbsmax()
    {
        using var scope = NewDisposeScope();
        long[] sizes = [1, 4095, 4096, 100_000];
        var ps = sizes.Select(n => new Parameter(zeros(n), requires_grad: true)).ToList();
        using var opt = new AdamW8bit(ps, 1e-3, Beta1, Beta2, Eps, WeightDecay);
        Assert.Equal(new[] { false, false, true, true }, opt.States.Select(s => s.Blockwise));
        Assert.All(opt.States.Where(s => s.Blockwise), s =>
        {
            Assert.Equal((ScalarType.Byte, ScalarType.Byte), (s.State1.dtype, s.State2.dtype));
            Assert.Equal(AdamW8bit.Blocks(s.Param.numel()), s.Absmax1!.numel());
        });
        Assert.All(opt.States.Where(s => !s.Blockwise), s => Assert.Equal((ScalarType.Float32, ScalarType.Float32), (s.State1.dtype, s.State2.dtype)));
        long expected = 8 * (1 + 4095) + (2 * 4096 + 8 * 16) + (2 * 100_000 + 8 * 391);
        Assert.Equal(expected, opt.StateBytes);
        Assert.Equal(expected, opt.States.Sum(s => new[] { s.State1, s.State2, s.Absmax1, s.Absmax2 }.Sum(t => t is null ? 0 : t.numel() * t.ElementSize)));
        // The big tensor: 2.03 bytes a parameter against fp32 AdamW's 8.
        Assert.Equal(2 * 100_000 + 8 * 391, opt.States[3].Bytes);
        Assert.Equal(8 * sizes.Sum(), AdamW8bit.Fp32StateBytes(ps));
    }

    private static List<Parameter> Parameters(int seed)
    {
        using var gen = new Generator((ulong)seed);
        return [new Parameter(randn([3, 5000], generator: gen), requires_grad: true), new Parameter(randn([300], generator: gen), requires_grad: true)];
    }

    private static void SetGradients(IEnumerable<Parameter> ps, int seed)
    {
        using var gen = new Generator((ulong)seed);
        using var noGrad = no_grad();
        foreach (var p in ps)
        {
            var g = randn(p.shape, generator: gen);
            using var current = p.grad;
            if (current is null) p.grad = g;
            else { current.copy_(g); g.Dispose(); }
        }
    }

    private static byte[] Serialized(AdamW8bit opt)
    {
        using var stream = new MemoryStream();
        using (var writer = new BinaryWriter(stream, System.Text.Encoding.UTF8, leaveOpen: true)) opt.Save(writer);
        return stream.ToArray();
    }

    [Fact]
    public void ASavedStateResumesBitIdentically()
    {
        using var scope = NewDisposeScope();
        var run = Parameters(1);
        using var uninterrupted = new AdamW8bit(run, 1e-2, Beta1, Beta2, Eps, WeightDecay);
        for (int step = 0; step < 3; step++) { SetGradients(run, 100 + step); uninterrupted.Step(); }
        byte[] saved = Serialized(uninterrupted);

        // A new process: fresh tensors holding the checkpoint's masters, the optimizer state read back.
        var resumedParams = run.Select(p => new Parameter(p.detach().clone(), requires_grad: true)).ToList();
        using var resumed = new AdamW8bit(resumedParams, 1e-2, Beta1, Beta2, Eps, WeightDecay);
        using (var reader = new BinaryReader(new MemoryStream(saved))) resumed.Load(reader);
        Assert.Equal(3, resumed.Steps);
        Assert.Equal(saved, Serialized(resumed));
        for (int step = 3; step < 6; step++)
        {
            uninterrupted.LearningRate = resumed.LearningRate = 1e-2 / step;
            SetGradients(run, 100 + step); uninterrupted.Step();
            SetGradients(resumedParams, 100 + step); resumed.Step();
        }
        Assert.Equal(Serialized(uninterrupted), Serialized(resumed));   // codes, absmax, fp32 moments, step
        for (int i = 0; i < run.Count; i++)
            Assert.Equal(run[i].detach().data<float>().ToArray(), resumedParams[i].detach().data<float>().ToArray());
    }

    private static TrainConfig Config(string optim) => new() { Model = "unused", Device = "cpu", Optim = optim, NanPolicy = NanPolicy.Skip };

    private static List<(string, Parameter)> Named(List<Parameter> ps) => ps.Select((p, i) => ($"t{i}", p)).ToList();

    [Fact]
    public void ANonFiniteGradientSkipsTheStepAndLeavesTheStateUntouched()
    {
        using var scope = NewDisposeScope();
        var ps = Parameters(2);
        using var opt = new TrainingOptimizer(Config("adamw_8bit"), Named(ps), dp: null, rank: 0, _ => { });
        var counters = new DataCounters();
        SetGradients(ps, 7);
        Assert.True(double.IsFinite(opt.Step(0, ["a"], counters, _ => { })));
        byte[] state = Serialized(opt.EightBit!);
        var values = ps.Select(p => p.detach().clone()).ToList();

        SetGradients(ps, 8);
        using (no_grad()) using (var g = ps[0].grad!) g[1, 17] = float.NaN;
        var warnings = new List<string>();
        Assert.False(double.IsFinite(opt.Step(1, ["b"], counters, warnings.Add)));
        Assert.Equal(1, counters.NanSkipped);
        Assert.Contains("optimizer step skipped", Assert.Single(warnings));
        Assert.Equal(1, opt.Steps);
        Assert.Equal(state, Serialized(opt.EightBit!));
        for (int i = 0; i < ps.Count; i++) Assert.Equal(values[i].data<float>().ToArray(), ps[i].detach().data<float>().ToArray());
    }

    [Fact]
    public void ACheckpointOfTheOtherOptimizerIsRefusedInOneLineNamingTheFile()
    {
        using var scope = NewDisposeScope();
        string dir = Path.Combine(Path.GetTempPath(), "vlmtune-adam8-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            var counters = new DataCounters();
            string Saved(string optim)
            {
                var ps = Parameters(3);
                using var opt = new TrainingOptimizer(Config(optim), Named(ps), dp: null, rank: 0, _ => { });
                SetGradients(ps, 9);
                opt.Step(0, ["a"], counters, _ => { });
                string sub = Path.Combine(dir, optim);
                Directory.CreateDirectory(sub);
                opt.SaveState(sub);
                return Path.Combine(sub, opt.StateFileName);
            }
            string fp32File = Saved("adamw"), eightBitFile = Saved("adamw_8bit");
            Assert.True(AdamW8bit.IsStateFile(eightBitFile));
            Assert.False(AdamW8bit.IsStateFile(fp32File));

            using var eightBit = new TrainingOptimizer(Config("adamw_bnb_8bit"), Named(Parameters(3)), dp: null, rank: 0, _ => { });
            using var fp32 = new TrainingOptimizer(Config("adamw_torch"), Named(Parameters(3)), dp: null, rank: 0, _ => { });
            var intoEightBit = Assert.Throws<VlmTuneException>(() => eightBit.LoadState(fp32File, 1));
            Assert.Contains(fp32File, intoEightBit.Message);
            Assert.Contains("fp32 AdamW states (optim: adamw) but this run has optim: adamw_bnb_8bit", intoEightBit.Message);
            Assert.DoesNotContain('\n', intoEightBit.Message);
            var intoFp32 = Assert.Throws<VlmTuneException>(() => fp32.LoadState(eightBitFile, 1));
            Assert.Contains(eightBitFile, intoFp32.Message);
            Assert.Contains("8-bit AdamW states (optim: adamw_8bit) but this run has optim: adamw_torch", intoFp32.Message);

            // Each loads its own; a truncated 8-bit file says so with the size this run's state takes.
            eightBit.LoadState(eightBitFile, 1);
            fp32.LoadState(fp32File, 1);
            byte[] bytes = File.ReadAllBytes(eightBitFile);
            File.WriteAllBytes(eightBitFile, bytes[..(bytes.Length / 2)]);
            var truncated = Assert.Throws<VlmTuneException>(() => eightBit.LoadState(eightBitFile, 1));
            Assert.Contains($"8-bit AdamW state takes {bytes.Length} bytes, the file has {bytes.Length / 2}", truncated.Message);
            File.WriteAllBytes(eightBitFile, bytes);
            var wrongStep = Assert.Throws<VlmTuneException>(() => eightBit.LoadState(eightBitFile, 2));
            Assert.Contains("at optimizer step 1 but the checkpoint's trainer state says 2", wrongStep.Message);
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    [Fact]
    public void TheRecipeKeyAcceptsHuggingFaceNamesAndRefusesOthersInOneLine()
    {
        const string minimal = "model: m\ndata: d.jsonl\n";
        Assert.Equal(("adamw", false), Parse(minimal));
        foreach (var name in new[] { "adamw", "adamw_torch" }) Assert.Equal(("adamw", false), Parse(minimal + $"optim: {name}\n"));
        foreach (var name in new[] { "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit" }) Assert.Equal(("adamw_8bit", true), Parse(minimal + $"optim: {name}\n"));
        var unknown = Assert.Throws<ConfigException>(() => TrainConfig.Parse(minimal + "optim: sgd\n", "x.yaml"));
        var problem = Assert.Single(unknown.Problems);
        Assert.StartsWith("'optim': 'sgd' is not an optimizer vlmtune has (accepted: adamw or adamw_torch", problem);
        Assert.Contains("adamw_8bit, adamw_bnb_8bit or paged_adamw_8bit", problem);
        var offload = Assert.Throws<ConfigException>(() => TrainConfig.Parse(minimal + "optim: adamw_8bit\noptimizer_offload: true\n", "x.yaml"));
        Assert.StartsWith("'optim': adamw_8bit cannot be combined with optimizer_offload", Assert.Single(offload.Problems));
        // The resolved config (what checkpoints and the run folder keep) reads back the same.
        var c = TrainConfig.Parse(minimal + "optim: paged_adamw_8bit\n", "x.yaml");
        Assert.Equal("paged_adamw_8bit", TrainConfig.Parse(c.Resolved().ToYaml(), "y.yaml").Optim);

        static (string, bool) Parse(string yaml)
        {
            var config = TrainConfig.Parse(yaml, "x.yaml");
            return (config.OptimizerName, config.Adam8bit);
        }
    }
}
