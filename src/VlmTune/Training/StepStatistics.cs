using System.Diagnostics;
using VlmTune.Models;

namespace VlmTune.Training;

/// <summary>
/// Model FLOPs of a training step, as MFU counts them (the trainer's log and <c>vlmtune bench train</c> share this):
/// 6·N per token for the LLM (forward + backward), and per ViT token 6·N for a trained ViT or 2·N for a frozen one
/// (forward only).
/// </summary>
public sealed record TrainingFlops(long LlmParams, long VitParams, long VitTokensPerTile, bool VisionTrainable)
{
    /// <summary>
    /// Counts the parameters before quantisation (NF4 stores them packed). N of the LLM is the matmul weights a token
    /// meets: the decoder layers and the output head (a tied head is the embedding matrix), not the embedding lookup.
    /// </summary>
    public static TrainingFlops Of(InternVLChatModel model, bool visionTrainable) => new(
        model.language_model.LayerStack.parameters().Sum(p => p.numel()) + model.language_model.OutputHead.weight!.numel(),
        model.vision_model.parameters().Sum(p => p.numel()),
        (long)model.Config.Vision.PatchesPerSide * model.Config.Vision.PatchesPerSide + 1,   // patches + the class token
        visionTrainable);

    public double Step(long tokens, long tiles) =>
        6.0 * LlmParams * tokens + (VisionTrainable ? 6.0 : 2.0) * VitParams * VitTokensPerTile * tiles;

    /// <summary>Model FLOPs utilisation per device of <paramref name="devices"/> at <paramref name="peakTflops"/> each.</summary>
    public double Mfu(long tokens, long tiles, double seconds, double peakTflops, int devices = 1) =>
        Step(tokens, tiles) / (seconds * peakTflops * 1e12 * devices);
}

/// <summary>
/// The iterations since the last log line: their times, losses and the tokens and tiles they trained on, turned into
/// the line's figures (mean time, mean loss over iterations that had one, tokens/s, MFU).
/// </summary>
public sealed class StepStatistics(TrainingFlops flops, double? peakTflops, int worldSize)
{
    private int _count, _lossCount;
    private double _time, _dataTime, _lossSum;
    private long _tokens, _tiles;

    public void Add(double time, double dataTime, double loss, long tokens, long tiles)
    {
        _count++; _time += time; _dataTime += dataTime; _tokens += tokens; _tiles += tiles;
        if (double.IsFinite(loss)) { _lossSum += loss; _lossCount++; }
    }

    /// <summary>The log line of the window ending at <paramref name="iteration"/>; the window then starts again.</summary>
    public IterationStats Close(long iteration, long totalIterations, double lr, double eta, long memoryMb, double? gradNorm, long optimizerSteps)
    {
        // Tokens and tiles are the whole job's; MFU is per device.
        double? mfu = peakTflops is { } peak ? flops.Mfu(_tokens, _tiles, _time, peak, worldSize) : null;
        var stats = new IterationStats(iteration, totalIterations, lr, eta, _time / _count, _dataTime / _count, memoryMb,
            _lossCount == 0 ? double.NaN : _lossSum / _lossCount, gradNorm, _tokens / Math.Max(_time, 1e-9), mfu, optimizerSteps);
        _count = _lossCount = 0;
        _time = _dataTime = _lossSum = 0;
        _tokens = _tiles = 0;
        return stats;
    }

    /// <summary>
    /// The log's memory column (MiB): on CUDA the peak since the last log line, of live tensor bytes under the
    /// cudaMallocAsync allocator backend (mmengine's max_memory_allocated) and of device memory otherwise (see
    /// <see cref="VlmTune.Diagnostics.GpuMemoryMonitor"/>); on CPU the process's peak working set.
    /// </summary>
    public static long MemoryMb(VlmTune.Diagnostics.GpuMemoryMonitor? gpu) =>
        (gpu?.PeakBytes ?? Process.GetCurrentProcess().PeakWorkingSet64) / (1024 * 1024);
}
