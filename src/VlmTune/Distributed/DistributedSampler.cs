namespace VlmTune.Distributed;

/// <summary>
/// Splits one global sample order (already length-grouped and shuffled the same way on every rank, from the same seed)
/// between data-parallel ranks, so that each optimizer step sees the same global batch as a single process would.
/// </summary>
public static class DistributedSampler
{
    /// <summary>
    /// Rank <paramref name="rank"/>'s indices: for each optimizer step, the global batch is the next
    /// worldSize × perRankBatch consecutive indices of <paramref name="globalOrder"/>, and rank r takes the contiguous
    /// slice [r·perRankBatch, (r+1)·perRankBatch) of it, which keeps length-grouped neighbours together on one rank.
    /// The tail that does not fill a whole global batch is dropped, so every rank runs the same number of steps
    /// (a rank with one step more would hang the others in all-reduce).
    /// </summary>
    public static long[] Shard(long[] globalOrder, int rank, int worldSize, int perRankBatch)
    {
        ArgumentNullException.ThrowIfNull(globalOrder);
        if (worldSize < 1) throw new ArgumentOutOfRangeException(nameof(worldSize), worldSize, "must be >= 1");
        if (rank < 0 || rank >= worldSize) throw new ArgumentOutOfRangeException(nameof(rank), rank, $"must be in [0, {worldSize})");
        if (perRankBatch < 1) throw new ArgumentOutOfRangeException(nameof(perRankBatch), perRankBatch, "must be >= 1");

        var globalBatch = (long)worldSize * perRankBatch;
        var steps = StepCount(globalOrder.LongLength, worldSize, perRankBatch);
        var shard = new long[steps * perRankBatch];
        for (long step = 0; step < steps; step++)
            Array.Copy(globalOrder, step * globalBatch + (long)rank * perRankBatch, shard, step * perRankBatch, perRankBatch);
        return shard;
    }

    /// <summary>Optimizer steps per epoch: whole global batches only.</summary>
    public static long StepCount(long sampleCount, int worldSize, int perRankBatch) => sampleCount / ((long)worldSize * perRankBatch);

    /// <summary>Samples dropped at the end of each epoch because they do not fill a global batch.</summary>
    public static long DroppedCount(long sampleCount, int worldSize, int perRankBatch) => sampleCount % ((long)worldSize * perRankBatch);
}
