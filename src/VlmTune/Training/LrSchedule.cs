namespace VlmTune.Training;

/// <summary>
/// XTuner's schedule as mmengine runs it, stepped every iteration (micro-batch): LinearLR from
/// <see cref="StartFactor"/> × lr to lr over the warm-up iterations, then CosineAnnealingLR down to 0 at the last one.
/// </summary>
public sealed class LrSchedule(double baseLr, long totalIterations, double warmupRatio)
{
    public const double StartFactor = 1e-5;

    public double BaseLr { get; } = baseLr;
    public long TotalIterations { get; } = totalIterations;
    /// <summary>mmengine converts the epoch-based end (warmup_ratio × epochs) to iterations by truncation.</summary>
    public long WarmupIterations { get; } = (long)(warmupRatio * totalIterations);

    /// <summary>The learning rate used by iteration <paramref name="iteration"/> (0-based).</summary>
    public double At(long iteration)
    {
        if (iteration < WarmupIterations)
            return BaseLr * (StartFactor + (1 - StartFactor) * iteration / WarmupIterations);
        long span = TotalIterations - WarmupIterations;
        if (span <= 0) return BaseLr;
        double t = Math.Min(iteration - WarmupIterations, span);
        return BaseLr * (1 + Math.Cos(Math.PI * t / span)) / 2;
    }
}
