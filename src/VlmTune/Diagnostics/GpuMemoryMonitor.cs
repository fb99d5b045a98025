using System.Runtime.InteropServices;

namespace VlmTune.Diagnostics;

/// <summary>
/// Peak GPU memory in use on a device, sampled through NVML on a background thread. TorchSharp exposes none of the
/// caching allocator's statistics, so this is the device-level figure (allocator reservations and the CUDA context
/// included): an upper bound of PyTorch's max_memory_allocated. Returns null where NVML is absent (CPU machines).
/// </summary>
public sealed class GpuMemoryMonitor : IDisposable
{
    private readonly IntPtr _device;
    private readonly Thread? _thread;
    private volatile bool _stop;
    private long _peak;

    public bool Available { get; }

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

    /// <summary>Highest used bytes seen since start or the last <see cref="Reset"/>.</summary>
    public long? PeakBytes { get { if (!Available) return null; Sample(); return Interlocked.Read(ref _peak); } }

    public long? CurrentBytes => Available && Nvml.nvmlDeviceGetMemoryInfo(_device, out var m) == 0 ? (long)m.Used : null;

    public void Reset() => Interlocked.Exchange(ref _peak, CurrentBytes ?? 0);

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
