using TorchSharp;
using TorchSharp.Modules;
using VlmTune.Cuda;
using static TorchSharp.torch;

namespace VlmTune.Training;

/// <summary>
/// TorchSharp's AdamW step and libtorch's clip_grad_norm_ for every trainable tensor in three CUDA launches
/// (Cuda/Kernels/adamw.cu): the gradients' norm, its clip coefficient, and the clipped update with the gradients zeroed.
/// TorchSharp's AdamW issues about ten kernels per tensor from .NET (2,500 launches, ~45 ms of host time per step
/// for InternVL2-2B's LoRA), which on short samples is a sixth of the step. The state stays TorchSharp's own: the
/// kernels update its exp_avg / exp_avg_sq tensors and its step counts in place, so checkpoints and resumes are the
/// same files either way. fp32 CUDA tensors only (masters are fp32); <see cref="TryCreate"/> says null otherwise.
/// </summary>
public sealed class FusedAdamW : IDisposable
{
    /// <summary>Elements per block (the kernels' CHUNK).</summary>
    public const int ChunkElements = 32768;
    internal const int Threads = 512;

    private readonly AdamW _adamW;
    private readonly IReadOnlyList<Parameter> _updated;
    private readonly double _beta1, _beta2, _eps, _weightDecay;
    private readonly KernelModule _module;
    private readonly Device _device;
    private readonly Tensor _norm;   // (2) fp32: the last step's norm and clip coefficient
    private KernelTable? _normTable, _updateTable;

    private FusedAdamW(AdamW adamW, IReadOnlyList<Parameter> updated, double beta1, double beta2, double eps, double weightDecay, KernelModule module, Device device)
    {
        (_adamW, _updated, _beta1, _beta2, _eps, _weightDecay, _module, _device) = (adamW, updated, beta1, beta2, eps, weightDecay, module, device);
        _norm = zeros(2, ScalarType.Float32, device).DetachFromDisposeScope();
    }

    /// <summary>
    /// The fused step for <paramref name="adamW"/> over <paramref name="updated"/> (its parameters, in order), or null
    /// with <paramref name="whyNot"/> where it cannot run: a tensor off CUDA or not fp32, or NVRTC / the driver missing.
    /// </summary>
    public static FusedAdamW? TryCreate(AdamW adamW, IReadOnlyList<Parameter> updated, double beta1, double beta2, double eps, double weightDecay, out string? whyNot)
    {
        whyNot = null;
        if (updated.Count == 0) { whyNot = "no tensor to update"; return null; }
        var device = updated[0].device;
        if (device.type != DeviceType.CUDA) { whyNot = "the optimizer's tensors are not on CUDA"; return null; }
        if (updated.FirstOrDefault(p => p.dtype != ScalarType.Float32 || p.device.type != DeviceType.CUDA || p.device.index != device.index || !p.is_contiguous()) is { } odd)
        {
            whyNot = $"a tensor is {odd.dtype} on {odd.device} (the kernels take contiguous fp32 tensors on one GPU)";
            return null;
        }
        try
        {
            var module = Module(device);
            return new FusedAdamW(adamW, updated, beta1, beta2, eps, weightDecay, module, device);
        }
        catch (CudaException e)
        {
            whyNot = e.Message;
            return null;
        }
    }

    /// <summary>
    /// Clips and applies the gradients: the norm covers <paramref name="normed"/> (the update's tensors and, under
    /// ZeRO-1, the other ranks' ones), the update <see cref="_updated"/>, whose gradients are zeroed after use.
    /// Returns the norm before clipping (one device-to-host read). A non-finite norm leaves every parameter, moment,
    /// step count and gradient as it was: the caller decides what to do.
    /// </summary>
    public double Step(IReadOnlyList<Parameter> normed, double lr, double maxNorm)
    {
        _module.Driver.UsePrimaryContext(_device.index < 0 ? 0 : _device.index);
        var states = _adamW.state_dict().State.Cast<AdamW.State>().ToList();
        if (states.Count != _updated.Count) throw new InvalidOperationException($"the optimizer holds {states.Count} states for {_updated.Count} tensors");
        long done = states[0].step;
        if (states.Any(s => s.step != done)) throw new InvalidOperationException("fused AdamW: the tensors' step counts differ (one bias correction serves all)");
        using (var grads = new GradientHandles("fused AdamW"))
        {
            _normTable = NormTable(_normTable, normed.Select(p => grads.Of(p)).ToList(), _device);
            _updateTable = Refresh(_updateTable, _updated.Select((p, i) => new[] { (Tensor)p, grads.Of(p), states[i].exp_avg, states[i].exp_avg_sq }).ToList(), _device);
        }

        long norm = LaunchNorm(_module, _normTable, _norm, maxNorm, _device);

        long step = done + 1;   // every tensor steps every time (TrainingOptimizer fills missing gradients)
        double bc1 = 1 - Math.Pow(_beta1, step), bc2 = 1 - Math.Pow(_beta2, step);
        _module.Driver.Launch(_module.Function("adamw_step"), ((uint)_updateTable.Chunks, 1, 1), Threads, 0,
        [
            _updateTable.RowsPointer, _updateTable.ChunksPointer, norm,
            CudaDriver.Arg((float)(1 - lr * _weightDecay)), CudaDriver.Arg((float)_beta1), CudaDriver.Arg((float)(1 - _beta1)),
            CudaDriver.Arg((float)_beta2), CudaDriver.Arg((float)(1 - _beta2)), CudaDriver.Arg((float)_eps),
            CudaDriver.Arg((float)(lr / bc1)), CudaDriver.Arg((float)Math.Sqrt(bc2)), 1,
        ]);
        double total;
        using (var first = _norm[0]) total = first.item<float>();
        if (double.IsFinite(total))
            foreach (var s in states) s.step = step;
        return total;
    }

    /// <summary>adamw.cu compiled for <paramref name="device"/>'s GPU (cached; a <see cref="CudaException"/> where NVRTC or the driver is missing).</summary>
    internal static KernelModule Module(Device device) =>
        KernelModule.Get("adamw.cu", device.index < 0 ? 0 : device.index, new Dictionary<string, int> { ["CHUNK"] = ChunkElements });

    /// <summary>
    /// The gradients' norm and clip coefficient into <paramref name="norm"/> (2 fp32) from <paramref name="grads"/> (one
    /// gradient a row): two launches, shared with <see cref="FusedAdamW8bit"/>. Returns the norm tensor's pointer.
    /// </summary>
    internal static long LaunchNorm(KernelModule module, KernelTable grads, Tensor norm, double maxNorm, Device device)
    {
        long pointer = (long)TensorPointers.DataPointer(norm);
        using var partials = empty(Math.Max(1, grads.Chunks), ScalarType.Float32, device);
        module.Driver.Launch(module.Function("grad_sumsq"), ((uint)grads.Chunks, 1, 1), Threads, 0,
            [grads.RowsPointer, grads.ChunksPointer, (long)TensorPointers.DataPointer(partials)]);
        module.Driver.Launch(module.Function("grad_norm_finish"), (1, 1, 1), 1024, 0,
            [(long)TensorPointers.DataPointer(partials), grads.Chunks, CudaDriver.Arg((float)maxNorm), pointer]);
        return pointer;
    }

    /// <summary>One row per tensor holding only its gradient: the norm's table.</summary>
    internal static KernelTable NormTable(KernelTable? current, IReadOnlyList<Tensor> grads, Device device) =>
        Refresh(current, grads.Select(g => new[] { g }).ToList(), device);

    public void Dispose()
    {
        _norm.Dispose();
        _normTable?.Dispose();
        _updateTable?.Dispose();
    }

    /// <summary>Whether the kernels can read this tensor's gradient: fp32, contiguous, on CUDA.</summary>
    public static bool Accepts(Parameter p)
    {
        using var g = p.grad;
        return p.dtype == ScalarType.Float32 && p.device.type == DeviceType.CUDA && p.is_contiguous()
               && g is { dtype: ScalarType.Float32 } && g.is_contiguous();
    }

    /// <summary>
    /// Which block takes which elements: one (tensor, first element) pair per <see cref="ChunkElements"/> elements of
    /// each tensor, in tensor order. Empty tensors take none.
    /// </summary>
    public static List<(int Tensor, long Start)> PlanChunks(IReadOnlyList<long> counts)
    {
        var chunks = new List<(int, long)>();
        for (int t = 0; t < counts.Count; t++)
            for (long start = 0; start < counts[t]; start += ChunkElements) chunks.Add((t, start));
        return chunks;
    }

    /// <summary>
    /// Each row: the tensors' data pointers, then the element count (all tensors of a row have it; contiguous fp32),
    /// as <see cref="KernelTable"/> takes them.
    /// </summary>
    private static KernelTable Refresh(KernelTable? current, IReadOnlyList<Tensor[]> rows, Device device)
    {
        int width = rows.Count == 0 ? 1 : rows[0].Length + 1;
        var values = new long[rows.Count * width];
        var counts = new long[rows.Count];
        for (int r = 0; r < rows.Count; r++)
        {
            counts[r] = rows[r][0].numel();
            for (int c = 0; c < rows[r].Length; c++)
            {
                var t = rows[r][c];
                if (t.numel() != counts[r] || !t.is_contiguous() || t.dtype != ScalarType.Float32)
                    throw new InvalidOperationException($"fused AdamW: tensor {c} of row {r} is {t.dtype}, {t.numel()} elements, contiguous {t.is_contiguous()}; expected contiguous fp32 of {counts[r]}");
                values[r * width + c] = (long)TensorPointers.DataPointer(t);
            }
            values[r * width + width - 1] = counts[r];
        }
        return KernelTable.Refresh(current, values, counts, device);
    }
}
