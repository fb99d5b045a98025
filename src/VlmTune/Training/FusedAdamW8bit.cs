using TorchSharp;
using TorchSharp.Modules;
using VlmTune.Cuda;
using static TorchSharp.torch;

namespace VlmTune.Training;

/// <summary>
/// <see cref="AdamW8bit"/>'s step with clipping on CUDA in three launches for every tensor (Cuda/Kernels/adamw.cu):
/// the gradients' norm and clip coefficient (<see cref="FusedAdamW"/>'s kernels), then <c>adamw8bit_step</c>, which
/// dequantises, updates and requantises each block of 256 in registers and zeroes the gradients. Its arithmetic is the
/// tensor-op reference's (<see cref="AdamW8bit.Step"/>) operation for operation, so both give the same codes, absmax
/// and parameters, and the same checkpoint files. fp32 CUDA tensors only; <see cref="TryCreate"/> says null otherwise.
/// </summary>
public sealed class FusedAdamW8bit : IDisposable
{
    private readonly AdamW8bit _optimizer;
    private readonly KernelModule _module;
    private readonly Device _device;
    private readonly Tensor _norm;   // (2) fp32: the last step's norm and clip coefficient
    private readonly Tensor _maps;   // (512) fp32: the signed map, then the unsigned one
    private KernelTable? _normTable, _updateTable;

    private FusedAdamW8bit(AdamW8bit optimizer, KernelModule module, Device device)
    {
        (_optimizer, _module, _device) = (optimizer, module, device);
        _norm = zeros(2, ScalarType.Float32, device).DetachFromDisposeScope();
        _maps = optimizer.Maps().DetachFromDisposeScope();
    }

    /// <summary>The kernel for <paramref name="optimizer"/>, or null with <paramref name="whyNot"/> (not on CUDA, or NVRTC / the driver missing).</summary>
    public static FusedAdamW8bit? TryCreate(AdamW8bit optimizer, out string? whyNot)
    {
        whyNot = null;
        var device = optimizer.Device;
        if (device.type != DeviceType.CUDA) { whyNot = "the optimizer's tensors are not on CUDA"; return null; }
        try
        {
            return new FusedAdamW8bit(optimizer, FusedAdamW.Module(device), device);
        }
        catch (CudaException e)
        {
            whyNot = e.Message;
            return null;
        }
    }

    /// <summary>
    /// Clips and applies the gradients: the norm covers <paramref name="normed"/> (the optimizer's tensors and, under
    /// ZeRO-1, the other ranks' ones), the update every tensor of the optimizer, whose gradients are zeroed after use.
    /// Returns the norm before clipping (one device-to-host read). A non-finite norm leaves every parameter, code,
    /// absmax, step count and gradient as it was: the caller decides what to do.
    /// </summary>
    public double Step(IReadOnlyList<Parameter> normed, double maxNorm)
    {
        _module.Driver.UsePrimaryContext(_device.index < 0 ? 0 : _device.index);
        var states = _optimizer.States;
        using (var grads = new GradientHandles("fused 8-bit AdamW"))
        {
            _normTable = FusedAdamW.NormTable(_normTable, normed.Select(p => grads.Of(p)).ToList(), _device);
            var values = new long[states.Count * 7];
            var counts = new long[states.Count];
            for (int r = 0; r < states.Count; r++)
            {
                var s = states[r];
                long n = s.Param.numel();
                var g = grads.Of(s.Param);
                var moment = s.Blockwise ? ScalarType.Byte : ScalarType.Float32;
                Require(s.Param, ScalarType.Float32, n, r, "parameter");
                Require(g, ScalarType.Float32, n, r, "gradient");
                Require(s.State1, moment, n, r, "first moment");
                Require(s.State2, moment, n, r, "second moment");
                values[r * 7] = (long)TensorPointers.DataPointer(s.Param);
                values[r * 7 + 1] = (long)TensorPointers.DataPointer(g);
                values[r * 7 + 2] = (long)TensorPointers.DataPointer(s.State1);
                values[r * 7 + 3] = (long)TensorPointers.DataPointer(s.State2);
                if (s.Blockwise)
                {
                    Require(s.Absmax1!, ScalarType.Float32, AdamW8bit.Blocks(n), r, "first moment's absmax");
                    Require(s.Absmax2!, ScalarType.Float32, AdamW8bit.Blocks(n), r, "second moment's absmax");
                    values[r * 7 + 4] = (long)TensorPointers.DataPointer(s.Absmax1!);
                    values[r * 7 + 5] = (long)TensorPointers.DataPointer(s.Absmax2!);
                }
                values[r * 7 + 6] = counts[r] = n;
            }
            _updateTable = KernelTable.Refresh(_updateTable, values, counts, _device);
        }

        long norm = FusedAdamW.LaunchNorm(_module, _normTable, _norm, maxNorm, _device);
        var k = _optimizer.Scalars();
        _module.Driver.Launch(_module.Function("adamw8bit_step"), ((uint)_updateTable.Chunks, 1, 1), FusedAdamW.Threads, 0,
        [
            _updateTable.RowsPointer, _updateTable.ChunksPointer, norm, (long)TensorPointers.DataPointer(_maps),
            CudaDriver.Arg(k.Beta1), CudaDriver.Arg(k.OneMinusBeta1), CudaDriver.Arg(k.Beta2), CudaDriver.Arg(k.OneMinusBeta2),
            CudaDriver.Arg(k.EpsCorrection), CudaDriver.Arg(k.StepSize), CudaDriver.Arg(k.Decay),
        ]);
        double total;
        using (var first = _norm[0]) total = first.item<float>();
        if (double.IsFinite(total)) _optimizer.Steps++;
        return total;
    }

    private static void Require(Tensor t, ScalarType dtype, long count, int row, string what)
    {
        if (t.dtype != dtype || t.numel() != count || !t.is_contiguous() || t.device.type != DeviceType.CUDA)
            throw new InvalidOperationException($"fused 8-bit AdamW: tensor {row}'s {what} is {t.dtype}, {t.numel()} elements on {t.device}, contiguous {t.is_contiguous()}; expected contiguous {dtype} of {count} on CUDA");
    }

    public void Dispose()
    {
        _norm.Dispose();
        _maps.Dispose();
        _normTable?.Dispose();
        _updateTable?.Dispose();
    }
}
