namespace VlmTune.Diagnostics;

/// <summary>
/// Where a training step's GPU memory peaks: with VLMTUNE_MEMORY_TRACE=N (an iteration number, passed in as
/// <see cref="RuntimeSwitches.MemoryTraceIteration"/>) and the cudaMallocAsync allocator backend, iteration N prints,
/// at each marked phase (vision, decoder forward, loss, every checkpointed layer's recompute and backward, optimizer
/// step), the bytes in use, the highest since the previous mark and the host time since it. Reads the pool counters
/// the host updates at each allocation, so no synchronisation is added: the host time is the time to issue the phase's
/// work (with CUDA_LAUNCH_BLOCKING=1 it includes the GPU's). Off: one branch per mark.
/// </summary>
public static class MemoryTrace
{
    private static GpuMemoryMonitor? _monitor;
    private static long _windowPeak;
    private static readonly System.Diagnostics.Stopwatch Clock = new();

    /// <summary>The highest segment peak seen since the last <see cref="ResetWindow"/> (the monitor's high-water mark is reset per mark).</summary>
    internal static long WindowPeak => Interlocked.Read(ref _windowPeak);
    internal static void ResetWindow() => Interlocked.Exchange(ref _windowPeak, 0);

    /// <summary>Starts tracing when <paramref name="iteration"/> (1-based) is <paramref name="traced"/>; stops otherwise.</summary>
    public static void BeginIteration(long iteration, GpuMemoryMonitor? monitor, long? traced)
    {
        _monitor = iteration == traced && monitor is { Source: GpuMemoryMonitor.MemorySource.AllocatorPool } ? monitor : null;
        if (_monitor is null) return;
        Console.Error.WriteLine($"memory trace, iteration {iteration} (MiB: in use now / peak since the previous mark; host ms since it):");
        Clock.Restart();
        Mark("start");
    }

    public static void Mark(string phase)
    {
        if (_monitor is not { } m) return;
        long peak = m.PoolPeakBytes ?? 0, now = m.CurrentBytes ?? 0;
        long seen;
        while (peak > (seen = Interlocked.Read(ref _windowPeak)) && Interlocked.CompareExchange(ref _windowPeak, peak, seen) != seen) { }
        m.ResetPoolHighWater();
        double ms = Clock.Elapsed.TotalMilliseconds;
        Clock.Restart();
        Console.Error.WriteLine($"  {phase,-28} {now / (1 << 20),7} / {peak / (1 << 20),7} {ms,9:F2}");
    }
}
