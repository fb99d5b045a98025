namespace VlmTune.Distributed;

/// <summary>
/// Splits one global sample order (length-grouped and shuffled identically on every rank, from the same seed, with the
/// mega-batch size of the global batch) between data-parallel ranks, so every optimizer step sees the global batch a
/// single process with batch_size × world_size would see.
/// </summary>
public static class DistributedSampler
{
    /// <summary>
    /// Rank <paramref name="rank"/>'s micro-batch of global batch <paramref name="step"/>: the global batch is the next
    /// worldSize × perRankBatch indices of <paramref name="globalOrder"/>, dealt round-robin as XTuner's sampler deals
    /// them (rank r takes positions r, r + worldSize, ...). The order is sorted by length within mega-batches, so dealing
    /// gives every rank samples of similar length and no rank waits at the all-reduce for a rank holding all the long
    /// ones. The last global batch of an epoch may be short, leaving a rank fewer samples (or none); the trainer weighs
    /// gradients by the global token count, so the step equals the single-process one.
    /// </summary>
    public static long[] RankBatch(long[] globalOrder, long step, int rank, int worldSize, int perRankBatch)
    {
        ArgumentNullException.ThrowIfNull(globalOrder);
        if (worldSize < 1) throw new ArgumentOutOfRangeException(nameof(worldSize), worldSize, "must be >= 1");
        if (rank < 0 || rank >= worldSize) throw new ArgumentOutOfRangeException(nameof(rank), rank, $"must be in [0, {worldSize})");
        if (perRankBatch < 1) throw new ArgumentOutOfRangeException(nameof(perRankBatch), perRankBatch, "must be >= 1");
        long steps = StepCount(globalOrder.LongLength, worldSize, perRankBatch);
        if (step < 0 || step >= steps) throw new ArgumentOutOfRangeException(nameof(step), step, $"must be in [0, {steps})");

        long start = step * worldSize * perRankBatch;
        long end = Math.Min(start + (long)worldSize * perRankBatch, globalOrder.LongLength);
        var batch = new List<long>(perRankBatch);
        for (long i = start + rank; i < end; i += worldSize) batch.Add(globalOrder[i]);
        return batch.ToArray();
    }

    /// <summary>Global batches per epoch, the last one possibly short.</summary>
    public static long StepCount(long sampleCount, int worldSize, int perRankBatch)
    {
        long global = (long)worldSize * perRankBatch;
        return (sampleCount + global - 1) / global;
    }
}
