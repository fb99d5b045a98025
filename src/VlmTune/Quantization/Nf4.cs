using TorchSharp;
using VlmTune.Autograd;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Quantization;

/// <summary>
/// A weight stored as 4-bit NormalFloat with bitsandbytes' semantics (quantize_4bit, quant_type "nf4"): blocks of
/// <see cref="Nf4.BlockSize"/> values scaled by their absmax, each value the NF4 code whose decision threshold it passes,
/// two codes per byte (element 2i in the high nibble). With double quantisation (compress_statistics) the fp32 absmax
/// values, minus their mean, are themselves quantised to 8 bits with the signed dynamic map in blocks of 256.
/// </summary>
public sealed class Nf4Tensor : IDisposable
{
    /// <summary>(⌈n/2⌉) uint8: two 4-bit codes per byte, the first element in the high nibble.</summary>
    public required Tensor Packed { get; init; }
    /// <summary>Without double quantisation: (blocks) fp32 absmax. With it: (blocks) uint8 codes of the dynamic map.</summary>
    public required Tensor Absmax { get; init; }
    /// <summary>Double quantisation: (⌈blocks/256⌉) fp32 absmax of the centred absmax values; null without it.</summary>
    public Tensor? Absmax2 { get; init; }
    /// <summary>Double quantisation: the mean subtracted from the absmax values before quantising them.</summary>
    public float Offset { get; init; }
    public required long[] Shape { get; init; }
    public required ScalarType DType { get; init; }
    /// <summary>Dequantise on CUDA with our kernel; false: tensor ops (VLMTUNE_NF4_KERNEL=0, <see cref="RuntimeSwitches.Nf4Kernel"/>).</summary>
    public bool CudaKernel { get; init; } = true;

    public bool DoubleQuantized => Absmax2 is not null;
    public long Count => Shape.Aggregate(1L, (a, b) => a * b);

    /// <summary>Bytes held on the device (codes + statistics).</summary>
    public long StorageBytes => Packed.numel() + Absmax.numel() * Absmax.ElementSize + (Absmax2?.numel() ?? 0) * 4;

    /// <summary>The fp32 absmax of each 64-value block (undoing the double quantisation if any).</summary>
    public Tensor BlockAbsmax()
    {
        if (Absmax2 is null) return Absmax.alias();
        using var scope = NewDisposeScope();
        var code = Nf4.DynamicMap(Absmax.device);
        var q = code.index_select(0, Absmax.to_type(ScalarType.Int32));                  // (blocks)
        long blocks = q.shape[0], padded = (blocks + Nf4.StatisticsBlockSize - 1) / Nf4.StatisticsBlockSize * Nf4.StatisticsBlockSize;
        var scaled = nn.functional.pad(q, [0, padded - blocks]).view(-1, Nf4.StatisticsBlockSize) * Absmax2!.unsqueeze(1);
        return (scaled.view(-1)[..(int)blocks] + Offset).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The dequantised weight in <paramref name="dtype"/> (default: the original dtype), on the storage device. On CUDA
    /// (bf16 / fp32) one kernel writes it directly (<see cref="Nf4CudaDequantizer"/>); elsewhere tensor ops do.
    /// Both give the same bits.
    /// </summary>
    public Tensor Dequantize(ScalarType? dtype = null)
    {
        var target = dtype ?? DType;
        if (Nf4CudaDequantizer.TryDequantize(this, target) is { } fast) return fast;
        return DequantizeWithTensorOps(target);
    }

    /// <summary>The portable path: ~19 bytes of temporaries per weight element, a dozen kernels.</summary>
    public Tensor DequantizeWithTensorOps(ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var high = Packed.bitwise_right_shift(4);
        var low = Packed.bitwise_and(15);
        var codes = stack([high, low], 1).view(-1)[..(int)Count].to_type(ScalarType.Int32);  // (n) element order restored
        var values = Nf4.Codebook(Packed.device).index_select(0, codes);                      // (n) in [-1, 1]
        long blocks = (Count + Nf4.BlockSize - 1) / Nf4.BlockSize;
        var absmax = BlockAbsmax();
        var scaled = nn.functional.pad(values, [0, blocks * Nf4.BlockSize - Count]).view(blocks, Nf4.BlockSize) * absmax.unsqueeze(1);
        return scaled.view(-1)[..(int)Count].view(Shape).to_type(dtype).MoveToOuterDisposeScope();
    }

    public void Dispose()
    {
        Packed.Dispose(); Absmax.Dispose(); Absmax2?.Dispose();
    }
}

/// <summary>
/// NF4 dequantisation on CUDA with our kernel (Cuda/Kernels/nf4.cu, compiled by NVRTC on first use): reads the packed
/// codes once and writes the bf16/fp32 weight, where the tensor-op path allocates a dozen full-size temporaries per call
/// (QLoRA dequantises every frozen linear twice per step, and again in the checkpointed recompute).
/// VLMTUNE_NF4_KERNEL=0 turns it off; without NVRTC it falls back to tensor ops (warning once on stderr).
/// </summary>
public static class Nf4CudaDequantizer
{
    private static readonly object Gate = new();
    private static readonly Dictionary<int, Tensor> DynamicMaps = new();
    private static string? _unavailable;

    /// <summary>Why the kernel is not used in this process, once it failed to load; null while it works.</summary>
    public static string? Unavailable => _unavailable;

    public static Tensor? TryDequantize(Nf4Tensor q, ScalarType dtype)
    {
        if (!q.CudaKernel || q.Packed.device_type != DeviceType.CUDA || dtype is not (ScalarType.BFloat16 or ScalarType.Float32) || _unavailable is not null) return null;
        int ordinal = q.Packed.device_index < 0 ? 0 : q.Packed.device_index;
        VlmTune.Cuda.KernelModule module;
        Tensor map;
        try
        {
            module = VlmTune.Cuda.KernelModule.Get("nf4.cu", ordinal, new Dictionary<string, int>());
            lock (Gate)
            {
                if (!DynamicMaps.TryGetValue(ordinal, out map!))
                    DynamicMaps[ordinal] = map = Nf4.DynamicMap(q.Packed.device).DetachFromDisposeScope();
            }
        }
        catch (VlmTune.Cuda.CudaException e)
        {
            _unavailable = e.Message;
            Console.Error.WriteLine($"warning: NF4 CUDA kernel unavailable, dequantising with tensor ops: {e.Message}");
            return null;
        }
        module.Driver.UsePrimaryContext(ordinal);
        var output = empty(q.Shape, dtype, q.Packed.device);
        long n = q.Count, bytes = (n + 1) / 2;
        const int block = 256;
        long P(Tensor? t) => t is null ? 0 : (long)VlmTune.Cuda.TensorPointers.DataPointer(t);
        var kernel = module.Function(dtype == ScalarType.BFloat16 ? "nf4_dequantize_bf16" : "nf4_dequantize_f32");
        module.Driver.Launch(kernel, ((uint)((bytes + block - 1) / block), 1, 1), block, 0,
        [
            P(q.Packed), q.DoubleQuantized ? 0 : P(q.Absmax), q.DoubleQuantized ? P(q.Absmax) : 0,
            P(map), P(q.Absmax2), VlmTune.Cuda.CudaDriver.Arg(q.Offset), P(output), n,
        ]);
        return output;
    }
}

public static class Nf4
{
    public const int BlockSize = 64;
    public const int StatisticsBlockSize = 256;

    /// <summary>The 16 NF4 values (bitsandbytes' get_4bit_type("nf4")), code 0 to 15.</summary>
    public static readonly float[] Values =
    [
        -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
        0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
    ];

    /// <summary>
    /// bitsandbytes' decision thresholds (dQuantizeNF4): a normalised value x gets the code equal to the number of
    /// thresholds it is strictly greater than. They sit halfway between neighbouring NF4 values.
    /// </summary>
    public static readonly float[] Thresholds =
    [
        -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
        -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
        0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
        0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f,
    ];

    public static Tensor Codebook(Device device) => tensor(Values, device: device);

    /// <summary>
    /// bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8): 256 sorted fp32 values, for each
    /// decade 10^(i-6) the midpoints of linspace(0.1, 1, 2^i + 1) (both signs), plus 0 and 1; unsigned (8-bit AdamW's
    /// second moment): the midpoints of linspace(0.1, 1, 2^(i+1) + 1), positive only, plus 0 and 1. Computed with
    /// libtorch's fp32 linspace and products, as bitsandbytes computes it with PyTorch's.
    /// </summary>
    public static Tensor DynamicMap(Device? device = null, bool signed = true)
    {
        var data = new List<float>();
        using (var scope = NewDisposeScope())
        {
            for (int i = 0; i < 7; i++)
            {
                int items = (1 << (signed ? i : i + 1)) + 1;
                var boundaries = linspace(0.1, 1.0, items, ScalarType.Float32);
                var means = (boundaries[..^1] + boundaries[1..]) / 2.0;
                double scale = Math.Pow(10, -6 + i);
                data.AddRange((means * scale).data<float>().ToArray());
                if (signed) data.AddRange((means * -scale).data<float>().ToArray());
            }
        }
        data.Add(0f);
        data.Add(1f);
        data.Sort();
        return tensor(data.ToArray(), device: device ?? CPU);
    }

    /// <summary>Quantises <paramref name="weight"/> (any float dtype and device) to NF4, on its device.</summary>
    public static Nf4Tensor Quantize(Tensor weight, bool doubleQuant = true, bool cudaKernel = true)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        long n = weight.numel();
        long blocks = (n + BlockSize - 1) / BlockSize;
        var flat = nn.functional.pad(weight.detach().reshape(-1).to_type(ScalarType.Float32), [0, blocks * BlockSize - n]);
        var grouped = flat.view(blocks, BlockSize);                                       // (blocks, 64)
        var absmax = grouped.abs().amax([1L]);                                             // (blocks) fp32
        // As the kernel: multiply by the fp32 reciprocal (an all-zero block gives NaN, which passes no threshold: code 0).
        var normalised = grouped * absmax.reciprocal().unsqueeze(1);
        var codes = zeros(normalised.shape, ScalarType.Byte, weight.device);
        foreach (var t in Thresholds) codes.add_(normalised.gt(t).to_type(ScalarType.Byte));
        codes = codes.view(-1)[..(int)n];
        if (n % 2 == 1) codes = cat([codes, zeros(1, ScalarType.Byte, weight.device)]);
        var pairs = codes.view(-1, 2);                                                     // (⌈n/2⌉, 2)
        var packed = pairs[.., 0].bitwise_left_shift(4).bitwise_or(pairs[.., 1]);

        Tensor absmaxStored; Tensor? absmax2 = null; float offset = 0;
        if (doubleQuant)
        {
            offset = absmax.mean().item<float>();
            (absmaxStored, absmax2) = QuantizeBlockwise8(absmax - offset, StatisticsBlockSize);
        }
        else absmaxStored = absmax;

        var result = new Nf4Tensor
        {
            Packed = packed.contiguous().MoveToOuterDisposeScope(),
            Absmax = absmaxStored.contiguous().MoveToOuterDisposeScope(),
            Absmax2 = absmax2?.contiguous().MoveToOuterDisposeScope(),
            Offset = offset, Shape = weight.shape, DType = weight.dtype, CudaKernel = cudaKernel,
        };
        return result;
    }

    /// <summary>
    /// bitsandbytes' quantize_blockwise with the signed dynamic map: per block of <paramref name="blockSize"/> values,
    /// absmax scaling and the code that kQuantizeBlockwise's binary search (dQuantize, non-stochastic) picks.
    /// </summary>
    public static (Tensor Codes, Tensor Absmax) QuantizeBlockwise8(Tensor values, int blockSize)
    {
        using var scope = NewDisposeScope();
        long n = values.numel();
        long blocks = (n + blockSize - 1) / blockSize;
        var grouped = nn.functional.pad(values.reshape(-1).to_type(ScalarType.Float32), [0, blocks * blockSize - n]).view(blocks, blockSize);
        var absmax = grouped.abs().amax([1L]);
        var x = (grouped * absmax.reciprocal().unsqueeze(1)).view(-1)[..(int)n];
        var codes = DynamicMapSearch(x, DynamicMap(values.device));
        return (codes.MoveToOuterDisposeScope(), absmax.MoveToOuterDisposeScope());
    }

    /// <summary>The dQuantize&lt;0&gt; binary search over a sorted 256-value code, element-wise.</summary>
    internal static Tensor DynamicMapSearch(Tensor x, Tensor code)
    {
        using var scope = NewDisposeScope();
        var device = x.device;
        var pivot = full(x.shape, 127L, ScalarType.Int64, device);
        var upperPivot = full(x.shape, 255L, ScalarType.Int64, device);
        var lowerPivot = zeros(x.shape, ScalarType.Int64, device);
        var lower = full(x.shape, -1f, ScalarType.Float32, device);
        var upper = full(x.shape, 1f, ScalarType.Float32, device);
        var val = code.index_select(0, pivot.view(-1)).view(x.shape);
        for (long step = 64; step > 0; step >>= 1)
        {
            var gt = x.gt(val);
            lowerPivot = where(gt, pivot, lowerPivot);
            lower = where(gt, val, lower);
            upperPivot = where(gt, upperPivot, pivot);
            upper = where(gt, upper, val);
            pivot = pivot + where(gt, step, -step);
            val = code.index_select(0, pivot.view(-1)).view(x.shape);
        }
        upper = where(upperPivot.eq(255), code[255], upper);
        lower = where(lowerPivot.eq(0), code[0], lower);
        var above = x.gt(val);
        var upMid = (upper + val) * 0.5f;
        var lowMid = (lower + val) * 0.5f;
        var result = where(above, where(x.gt(upMid), upperPivot, pivot), where(x.lt(lowMid), lowerPivot, pivot));
        return result.to_type(ScalarType.Byte).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Replaces a linear layer's weight by NF4 storage: the forward pass dequantises on the fly, the backward pass
    /// dequantises again to propagate to the input (the base weight is frozen; LoRA branches still train).
    /// </summary>
    public static Nf4Tensor QuantizeLinear(Linear linear, bool doubleQuant = true, bool cudaKernel = true)
    {
        if (linear.BaseForward is not null) throw new InvalidOperationException("the layer is already quantised.");
        var q = Quantize(linear.weight, doubleQuant, cudaKernel);
        var bias = linear.bias;
        linear.BaseForward = x =>
        {
            var y = LeanAutograd.AfterApply(Nf4Linear.apply(x, new Nf4Call(q)));
            return bias is null ? y : y + bias;
        };
        linear.WeightProvider = () => q.Dequantize();
        using (no_grad())
        {
            linear.weight.requires_grad_(false);
            // Free the full-precision storage; the parameter stays registered (empty) so module walks still work.
            linear.weight.set_(empty(0, linear.weight.dtype, linear.weight.device));
        }
        return q;
    }

    internal sealed record Nf4Call(Nf4Tensor Weight);

    internal sealed class Nf4Linear : autograd.SingleTensorFunction<Nf4Linear>
    {
        public override string Name => nameof(Nf4Linear);

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var x = (Tensor)vars[0];
            var call = (Nf4Call)vars[1];
            ctx.save_data("w", call);
            using var w = call.Weight.Dequantize(x.dtype);
            var y = nn.functional.linear(x, w);
            LeanAutograd.Remember(ctx, y);
            return y;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            var call = (Nf4Call)ctx.get_data("w");
            Tensor gradX;
            using (var scope = NewDisposeScope())
            {
                var w = call.Weight.Dequantize(gradOutput.dtype);                      // (out, in)
                gradX = matmul(gradOutput, w).MoveToOuterDisposeScope();              // (…, in)
            }
            // The engine keeps its own reference; ours would otherwise hold the gradient until the GC finalises it.
            gradOutput.Dispose();
            BackwardScratch.Keep(gradX);
            return [gradX, null!];
        }
    }
}
