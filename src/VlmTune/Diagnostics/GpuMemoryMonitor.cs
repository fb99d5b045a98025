using System.Runtime.InteropServices;

namespace VlmTune.Diagnostics;

/// <summary>
/// Peak GPU memory of a device. TorchSharp exposes none of the caching allocator's statistics, so there are two sources:
/// <list type="bullet">
/// <item>Under <c>PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync</c> PyTorch allocates from the device's default CUDA
/// memory pool, whose used-memory high-water mark the driver keeps exactly: the peak of live tensor bytes, what
/// torch.cuda.max_memory_allocated reports (<see cref="MemorySource.AllocatorPool"/>).</item>
/// <item>Otherwise the device-level figure sampled through NVML on a background thread: allocator reservations and the
/// CUDA context included, an upper bound of max_memory_allocated (<see cref="MemorySource.Device"/>).</item>
/// </list>
/// Returns null where NVML is absent (CPU machines).
/// </summary>
public sealed class GpuMemoryMonitor : IDisposable
{
    private readonly IntPtr _device;
    private readonly Thread? _thread;
    private volatile bool _stop;
    private long _peak;

    private readonly IntPtr? _pool;

    public bool Available { get; }

    public enum MemorySource { Device, AllocatorPool }

    public MemorySource Source => _pool is null ? MemorySource.Device : MemorySource.AllocatorPool;

    /// <summary>What <see cref="PeakBytes"/> measures, for log headers and benchmark output.</summary>
    public string SourceDescription => Source == MemorySource.AllocatorPool
        ? "allocator peak (live tensor bytes, cudaMallocAsync pool high-water mark)"
        : "device-level peak (NVML: CUDA context and allocator cache included)";

    /// <summary>True when PYTORCH_CUDA_ALLOC_CONF selects PyTorch's cudaMallocAsync allocator backend.</summary>
    public static bool UsesAsyncAllocator(string? allocConf = null)
    {
        allocConf ??= Environment.GetEnvironmentVariable("PYTORCH_CUDA_ALLOC_CONF") ?? "";
        return allocConf.Split([',', ';'], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .Any(kv => kv.Replace(" ", "") is "backend:cudaMallocAsync");
    }

    /// <summary>
    /// NVML ignores CUDA_VISIBLE_DEVICES: cuda:N is the N-th GPU that variable lists (e.g. a data-parallel rank's one
    /// GPU). Indices are taken as NVML's; a list of UUIDs falls back to N.
    /// </summary>
    public static int NvmlIndex(int cudaOrdinal, string? visibleDevices = null)
    {
        var list = (visibleDevices ?? Environment.GetEnvironmentVariable("CUDA_VISIBLE_DEVICES"))?.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        return list is not null && cudaOrdinal < list.Length && int.TryParse(list[cudaOrdinal], out var physical) ? physical : cudaOrdinal;
    }

    /// <param name="deviceIndex">The CUDA ordinal (cuda:N) as this process sees it.</param>
    public GpuMemoryMonitor(int deviceIndex = 0, int intervalMs = 5)
    {
        if (UsesAsyncAllocator())
        {
            try
            {
                _pool = Driver.DefaultMemoryPool(deviceIndex);
                if (_pool is { } pool) Driver.ResetHighWater(pool, VlmTune.Cuda.CudaDriver.MemoryPoolAttribute.UsedMemHigh);
            }
            catch (VlmTune.Cuda.CudaException) { _pool = null; }
        }
        try
        {
            if (Nvml.nvmlInit_v2() != 0 || Nvml.nvmlDeviceGetHandleByIndex_v2((uint)NvmlIndex(deviceIndex), out _device) != 0) return;
            Available = true;
            _thread = new Thread(() =>
            {
                while (!_stop) { Sample(); Thread.Sleep(intervalMs); }
            }) { IsBackground = true, Name = "gpu-memory-monitor" };
            _thread.Start();
        }
        catch (DllNotFoundException) { }
        catch (EntryPointNotFoundException) { }
    }

    /// <summary>Highest bytes in use since start or the last <see cref="Reset"/> (see <see cref="Source"/>).</summary>
    public long? PeakBytes => PoolPeakBytes is { } pool ? Math.Max(pool, MemoryTrace.WindowPeak) : DevicePeakBytes;

    /// <summary>The pool's high-water mark since its last reset (a reset one reads 0 until the next allocation).</summary>
    internal long? PoolPeakBytes => _pool is { } pool
        ? (long)Math.Max(Driver.GetAttribute(pool, VlmTune.Cuda.CudaDriver.MemoryPoolAttribute.UsedMemHigh),
            Driver.GetAttribute(pool, VlmTune.Cuda.CudaDriver.MemoryPoolAttribute.UsedMemCurrent))
        : null;

    /// <summary>Restarts the pool's high-water mark (MemoryTrace's per-phase peaks).</summary>
    internal void ResetPoolHighWater()
    {
        if (_pool is { } pool) Driver.ResetHighWater(pool, VlmTune.Cuda.CudaDriver.MemoryPoolAttribute.UsedMemHigh);
    }

    private static VlmTune.Cuda.CudaDriver Driver => VlmTune.Cuda.CudaDriver.Shared;

    /// <summary>The NVML device-level peak since start or the last <see cref="Reset"/>, whatever the source.</summary>
    public long? DevicePeakBytes { get { if (!Available) return null; Sample(); return Interlocked.Read(ref _peak); } }

    /// <summary>Bytes in use now, from the same source as <see cref="PeakBytes"/>.</summary>
    public long? CurrentBytes => _pool is { } pool ? (long)Driver.GetAttribute(pool, VlmTune.Cuda.CudaDriver.MemoryPoolAttribute.UsedMemCurrent) : DeviceCurrentBytes;

    private long? DeviceCurrentBytes => Available && Nvml.nvmlDeviceGetMemoryInfo(_device, out var m) == 0 ? (long)m.Used : null;

    public void Reset()
    {
        // Allocations still live count towards the next window's peak, as torch.cuda.reset_peak_memory_stats does.
        ResetPoolHighWater();
        MemoryTrace.ResetWindow();
        Interlocked.Exchange(ref _peak, DeviceCurrentBytes ?? 0);
    }

    private void Sample()
    {
        if (Nvml.nvmlDeviceGetMemoryInfo(_device, out var m) != 0) return;
        long used = (long)m.Used, seen;
        while (used > (seen = Interlocked.Read(ref _peak)) && Interlocked.CompareExchange(ref _peak, used, seen) != seen) { }
    }

    public void Dispose()
    {
        _stop = true;
        _thread?.Join();
    }

    private static class Nvml
    {
        [StructLayout(LayoutKind.Sequential)]
        public struct Memory { public ulong Total, Free, Used; }

        [DllImport("libnvidia-ml.so.1")] public static extern int nvmlInit_v2();
        [DllImport("libnvidia-ml.so.1")] public static extern int nvmlDeviceGetHandleByIndex_v2(uint index, out IntPtr device);
        [DllImport("libnvidia-ml.so.1")] public static extern int nvmlDeviceGetMemoryInfo(IntPtr device, out Memory memory);
    }
}
