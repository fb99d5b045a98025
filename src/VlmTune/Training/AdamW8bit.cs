using System.Text;
using TorchSharp;
using TorchSharp.Modules;
using VlmTune.Quantization;
using static TorchSharp.torch;

namespace VlmTune.Training;

/// <summary>
/// AdamW with 8-bit block-wise moments: bitsandbytes' <c>AdamW8bit</c> (bitsandbytes/optim/optimizer.py
/// <c>Optimizer2State</c>, csrc/kernels.cu <c>kOptimizerStatic8bit2StateBlockwise</c>), the QLoRA paper's optimizer
/// without the paging. Each tensor of at least <see cref="MinBlockwiseSize"/> (4,096) elements keeps exp_avg as uint8
/// codes of the signed dynamic map and exp_avg_sq as codes of the unsigned one
/// (<see cref="Nf4.DynamicMap"/>, <c>create_dynamic_map</c>), each block of <see cref="BlockSize"/> (256) elements
/// scaled by its fp32 absmax: 2 bytes a parameter plus 8 bytes a block, against 8 for fp32 moments. Smaller tensors
/// keep fp32 moments, as bitsandbytes' do. The parameters (fp32 masters) stay fp32.
///
/// An update, per element, in fp32 with one rounding per operation: dequantise (code value × block absmax), clip
/// (g × the clip coefficient), m = m·β1 + (1−β1)·g, v = v·β2 + ((1−β2)·g)·g, p += step_size · m / (√v + ε·c2) with
/// c2 = √(1−β2^t), step_size = −lr·c2/(1−β1^t), then the decoupled weight decay p ·= 1 − lr·wd (after the update, as
/// bitsandbytes' AdamW does; torch's AdamW decays first, a difference of order lr²·wd); then the block's new absmax
/// (max |m|, max v) and each value's nearest code by bitsandbytes' binary search (dQuantize), the first moment's code
/// moved one step where it would change the moment's sign (bitsandbytes' signbit check). The small tensors' fp32
/// moments take the same arithmetic, as bitsandbytes' 32-bit kernel does.
///
/// Where this differs from bitsandbytes: the host computes the step's scalars in double and rounds each once (bitsandbytes
/// computes them in fp32 with __powf on the GPU); the value-to-code division is IEEE (bitsandbytes: __fdividef), the
/// square root correctly rounded, and no operation is fused into an fma (nvcc contracts bitsandbytes'), so our CPU
/// reference and CUDA kernel (<see cref="FusedAdamW8bit"/>) agree bit for bit while bitsandbytes' codes may differ
/// from ours by one where a value lies within rounding of a midpoint; a block whose moments are all zero keeps the zero codes (bitsandbytes divides
/// 0 by 0 there and stores codes that dequantise to 0 as well), and fresh states start at the zero codes;
/// a non-finite gradient skips the whole step (the trainer's check on the gradient norm) where bitsandbytes zeroes that
/// element's moments; one step count serves every tensor, and the hyperparameters come from the recipe on a resume.
/// </summary>
public sealed class AdamW8bit : IDisposable
{
    /// <summary>bitsandbytes' BLOCKSIZE_2STATE: elements per absmax for the block-wise optimizer update.</summary>
    public const int BlockSize = 256;
    /// <summary>bitsandbytes' min_8bit_size: smaller tensors keep fp32 moments.</summary>
    public const long DefaultMinBlockwiseSize = 4096;
    /// <summary>Signed map: the code of 0 (a fresh first moment).</summary>
    public const byte SignedZeroCode = 127;
    /// <summary>Elements per slice of the tensor-op update: bounds its temporaries on big tensors (whole blocks).</summary>
    private const long SliceElements = 1L << 20;

    private static readonly byte[] Magic = Encoding.ASCII.GetBytes("VLMTUNE-ADAMW8BIT\n");
    private const int FormatVersion = 1;

    /// <summary>One tensor's moments: codes + absmax (blockwise), or fp32 exp_avg / exp_avg_sq.</summary>
    public sealed class TensorState : IDisposable
    {
        public required Parameter Param { get; init; }
        public bool Blockwise => Absmax1 is not null;
        /// <summary>Blockwise: uint8 codes of the signed map (exp_avg); else fp32 exp_avg.</summary>
        public required Tensor State1 { get; init; }
        /// <summary>Blockwise: uint8 codes of the unsigned map (exp_avg_sq); else fp32 exp_avg_sq.</summary>
        public required Tensor State2 { get; init; }
        /// <summary>Blockwise: fp32 absmax of each block of exp_avg / exp_avg_sq.</summary>
        public Tensor? Absmax1 { get; init; }
        public Tensor? Absmax2 { get; init; }

        public long Bytes => new[] { State1, State2, Absmax1, Absmax2 }.Sum(t => t is null ? 0 : t.numel() * t.ElementSize);

        public void Dispose()
        {
            State1.Dispose();
            State2.Dispose();
            Absmax1?.Dispose();
            Absmax2?.Dispose();
        }
    }

    private readonly Tensor _signedMap, _unsignedMap;

    public IReadOnlyList<TensorState> States { get; }
    public double Beta1 { get; }
    public double Beta2 { get; }
    public double Eps { get; }
    public double WeightDecay { get; }
    public long MinBlockwiseSize { get; }
    public double LearningRate { get; set; }
    /// <summary>Updates taken (the bias corrections' t is one more).</summary>
    public long Steps { get; internal set; }
    public Device Device { get; }

    /// <param name="minBlockwiseSize">Tensors with fewer elements keep fp32 moments (bitsandbytes' min_8bit_size).</param>
    public AdamW8bit(IReadOnlyList<Parameter> parameters, double lr, double beta1, double beta2, double eps, double weightDecay, long minBlockwiseSize = DefaultMinBlockwiseSize)
    {
        Device = parameters.Count > 0 ? parameters[0].device : CPU;
        if (parameters.FirstOrDefault(p => p.dtype != ScalarType.Float32 || !p.is_contiguous() || p.device.type != Device.type || p.device.index != Device.index) is { } odd)
            throw new ArgumentException($"8-bit AdamW updates contiguous fp32 tensors on one device; got {odd.dtype} on {odd.device} (contiguous {odd.is_contiguous()}) besides {Device}");
        (LearningRate, Beta1, Beta2, Eps, WeightDecay, MinBlockwiseSize) = (lr, beta1, beta2, eps, weightDecay, minBlockwiseSize);
        _signedMap = Nf4.DynamicMap(Device, signed: true).DetachFromDisposeScope();
        _unsignedMap = Nf4.DynamicMap(Device, signed: false).DetachFromDisposeScope();
        States = parameters.Select(p =>
        {
            long n = p.numel();
            if (n < minBlockwiseSize)
                return new TensorState
                {
                    Param = p,
                    State1 = zeros(n, ScalarType.Float32, Device).DetachFromDisposeScope(),
                    State2 = zeros(n, ScalarType.Float32, Device).DetachFromDisposeScope(),
                };
            long blocks = Blocks(n);
            return new TensorState
            {
                Param = p,
                State1 = full(n, SignedZeroCode, ScalarType.Byte, Device).DetachFromDisposeScope(),
                State2 = zeros(n, ScalarType.Byte, Device).DetachFromDisposeScope(),
                Absmax1 = zeros(blocks, ScalarType.Float32, Device).DetachFromDisposeScope(),
                Absmax2 = zeros(blocks, ScalarType.Float32, Device).DetachFromDisposeScope(),
            };
        }).ToList();
    }

    public static long Blocks(long n) => (n + BlockSize - 1) / BlockSize;

    /// <summary>The bytes the moments take (codes, absmax and the small tensors' fp32 moments).</summary>
    public long StateBytes => States.Sum(s => s.Bytes);

    /// <summary>What the same tensors' moments take in fp32 (torch's AdamW: exp_avg and exp_avg_sq).</summary>
    public static long Fp32StateBytes(IEnumerable<Tensor> parameters) => parameters.Sum(p => 8 * p.numel());

    /// <summary>The signed map (256 fp32) followed by the unsigned one, on the optimizer's device (the kernel's table).</summary>
    internal Tensor Maps() => cat([_signedMap, _unsignedMap]);

    /// <summary>The fp32 scalars of update t = <see cref="Steps"/> + 1, shared by this reference and the CUDA kernel.</summary>
    internal readonly record struct StepScalars(float Beta1, float OneMinusBeta1, float Beta2, float OneMinusBeta2, float EpsCorrection, float StepSize, float Decay);

    internal StepScalars Scalars()
    {
        long t = Steps + 1;
        double bc1 = 1 - Math.Pow(Beta1, t), c2 = Math.Sqrt(1 - Math.Pow(Beta2, t));
        return new StepScalars((float)Beta1, (float)(1 - Beta1), (float)Beta2, (float)(1 - Beta2), (float)(Eps * c2),
            (float)(-LearningRate * c2 / bc1), (float)(1 - LearningRate * WeightDecay));
    }

    /// <summary>
    /// One update of every tensor from its gradient (every tensor must have one) times <paramref name="clipCoefficient"/>,
    /// in tensor ops on the tensors' device: the reference, used on the CPU and where the CUDA kernel is unavailable.
    /// </summary>
    public void Step(float clipCoefficient = 1f)
    {
        var k = Scalars();
        using var noGrad = no_grad();
        foreach (var s in States) StepTensor(s, k, clipCoefficient);
        Steps++;
    }

    private void StepTensor(TensorState s, StepScalars k, float clipCoefficient)
    {
        using var grad = s.Param.grad ?? throw new InvalidOperationException("8-bit AdamW: a tensor has no gradient");
        using var flatGrad = grad.reshape(-1);
        using var flat = s.Param.view(-1);
        long n = flat.numel();
        for (long start = 0; start < n; start += SliceElements)
        {
            using var scope = NewDisposeScope();
            long len = Math.Min(SliceElements, n - start);
            var p = flat.narrow(0, start, len);
            var g = flatGrad.narrow(0, start, len);
            if (clipCoefficient != 1f) g = g * clipCoefficient;   // × 1 is exact: the kernel's unconditional product equals this
            Tensor m, v, c1 = s.State1.narrow(0, start, len), c2 = s.State2.narrow(0, start, len);
            Tensor? a1 = null, a2 = null;
            // Each product and sum separately: a fused multiply-add (add_'s alpha, addcmul) would round differently from the kernel.
            if (s.Blockwise)
            {
                long firstBlock = start / BlockSize, blocks = Blocks(len);
                a1 = s.Absmax1!.narrow(0, firstBlock, blocks);
                a2 = s.Absmax2!.narrow(0, firstBlock, blocks);
                m = DequantizeBlockwise(c1, a1, _signedMap) * k.Beta1 + g * k.OneMinusBeta1;
                v = DequantizeBlockwise(c2, a2, _unsignedMap) * k.Beta2 + g * k.OneMinusBeta2 * g;
            }
            else
            {
                m = c1.mul_(k.Beta1).add_(g * k.OneMinusBeta1);
                v = c2.mul_(k.Beta2).add_(g * k.OneMinusBeta2 * g);
            }
            p.copy_((p + m / (CorrectlyRoundedSqrt(v) + k.EpsCorrection) * k.StepSize) * k.Decay);
            if (!s.Blockwise) continue;
            var (codes1, absmax1) = QuantizeBlockwise(m, _signedMap, signed: true);
            var (codes2, absmax2) = QuantizeBlockwise(v, _unsignedMap, signed: false);
            c1.copy_(codes1);
            a1!.copy_(absmax1);
            c2.copy_(codes2);
            a2!.copy_(absmax2);
        }
    }

    /// <summary>
    /// √v rounded once to fp32, as the kernel's __fsqrt_rn: libtorch's CPU sqrt goes through MKL's vector math, which
    /// is within an ulp but not always the nearest float. In double, an error of an ulp there cannot move the result
    /// across an fp32 rounding boundary (√ of a float lies at least 2^-50 from one, relatively), so the conversion
    /// gives the correctly rounded fp32 root.
    /// </summary>
    private static Tensor CorrectlyRoundedSqrt(Tensor v) => v.to_type(ScalarType.Float64).sqrt_().to_type(ScalarType.Float32);

    /// <summary>Zeroes every gradient in place (the tensors keep them: the kernel's pointer table stays valid).</summary>
    public void ZeroGrad()
    {
        Gradients.Zero(States.Select(s => (Tensor)s.Param));
    }

    /// <summary>
    /// bitsandbytes' quantize_blockwise with a dynamic map: per block of <see cref="BlockSize"/> values, the absmax, and
    /// each value ÷ absmax's code by dQuantize's search. <paramref name="signed"/> (the first moment): a code whose value
    /// has the other sign bit moves one step towards the value's sign, as kOptimizerStatic8bit2StateBlockwise does. An
    /// all-zero block is divided by 1 (its codes are the zero codes; bitsandbytes divides by 0).
    /// </summary>
    public static (Tensor Codes, Tensor Absmax) QuantizeBlockwise(Tensor values, Tensor map, bool signed)
    {
        using var scope = NewDisposeScope();
        var flat = values.reshape(-1);
        long n = flat.numel(), blocks = Blocks(n);
        var grouped = nn.functional.pad(flat, [0, blocks * BlockSize - n]).view(blocks, BlockSize);
        var absmax = grouped.abs().amax([1L]);
        var divisor = absmax.masked_fill(absmax.eq(0), 1f);
        var x = (grouped / divisor.unsqueeze(1)).view(-1).narrow(0, 0, n);
        var codes = Nf4.DynamicMapSearch(x, map);
        if (signed)
        {
            var wide = codes.to_type(ScalarType.Int64);
            var flip = map.index_select(0, wide).signbit().ne(flat.signbit()).to_type(ScalarType.Int64);
            codes = wide.add_(where(flat.gt(0), 1L, -1L) * flip).to_type(ScalarType.Byte);
        }
        return (codes.MoveToOuterDisposeScope(), absmax.MoveToOuterDisposeScope());
    }

    /// <summary>Code value × its block's absmax, for <paramref name="codes"/> (n) and <paramref name="absmax"/> (⌈n / 256⌉).</summary>
    public static Tensor DequantizeBlockwise(Tensor codes, Tensor absmax, Tensor map)
    {
        using var scope = NewDisposeScope();
        long n = codes.numel(), blocks = absmax.numel();
        var values = map.index_select(0, codes.reshape(-1).to_type(ScalarType.Int64));
        var grouped = nn.functional.pad(values, [0, blocks * BlockSize - n]).view(blocks, BlockSize) * absmax.unsqueeze(1);
        return grouped.view(-1).narrow(0, 0, n).MoveToOuterDisposeScope();
    }

    /// <summary>Whether <paramref name="path"/> starts as this optimizer's state file does (else: another optimizer's).</summary>
    public static bool IsStateFile(string path)
    {
        using var stream = File.OpenRead(path);
        var head = new byte[Magic.Length];
        return stream.ReadAtLeast(head, head.Length, throwOnEndOfStream: false) == head.Length && head.AsSpan().SequenceEqual(Magic);
    }

    /// <summary>
    /// The state: a header (format, step count, block size, min size), then per tensor its element count, whether it is
    /// blockwise, and its moments (codes and absmax, or fp32) in TorchSharp's tensor format.
    /// </summary>
    public void Save(BinaryWriter writer)
    {
        writer.Write(Magic);
        writer.Write(FormatVersion);
        writer.Write(Steps);
        writer.Write(BlockSize);
        writer.Write(MinBlockwiseSize);
        writer.Write(States.Count);
        foreach (var s in States)
        {
            writer.Write(s.Param.numel());
            writer.Write(s.Blockwise);
            s.State1.Save(writer);
            s.State2.Save(writer);
            s.Absmax1?.Save(writer);
            s.Absmax2?.Save(writer);
        }
    }

    /// <summary>Reads what <see cref="Save"/> wrote into this optimizer's tensors; a file of other tensors is an <see cref="InvalidDataException"/>.</summary>
    public void Load(BinaryReader reader)
    {
        if (!reader.ReadBytes(Magic.Length).AsSpan().SequenceEqual(Magic)) throw new InvalidDataException("not an 8-bit AdamW state");
        int version = reader.ReadInt32();
        if (version != FormatVersion) throw new InvalidDataException($"8-bit AdamW state format {version}, this build reads {FormatVersion}");
        long steps = reader.ReadInt64();
        int blockSize = reader.ReadInt32();
        long minSize = reader.ReadInt64();
        int count = reader.ReadInt32();
        if (steps < 0) throw new InvalidDataException($"a step count of {steps}");
        if (blockSize != BlockSize || minSize != MinBlockwiseSize)
            throw new InvalidDataException($"blocks of {blockSize} and 8-bit tensors from {minSize} elements, this run has {BlockSize} and {MinBlockwiseSize}");
        if (count != States.Count) throw new InvalidDataException($"{count} tensors, this run optimises {States.Count}");
        for (int i = 0; i < count; i++)
        {
            var s = States[i];
            long n = reader.ReadInt64();
            bool blockwise = reader.ReadBoolean();
            if (n != s.Param.numel() || blockwise != s.Blockwise)
                throw new InvalidDataException($"tensor {i} has {n} elements{(blockwise ? " (8-bit)" : "")}, this run's has {s.Param.numel()}");
            s.State1.Load(reader);
            s.State2.Load(reader);
            s.Absmax1?.Load(reader);
            s.Absmax2?.Load(reader);
        }
        Steps = steps;
    }

    public void Dispose()
    {
        foreach (var s in States) s.Dispose();
        _signedMap.Dispose();
        _unsignedMap.Dispose();
    }
}
