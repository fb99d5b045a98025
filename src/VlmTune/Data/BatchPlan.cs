using VlmTune.Distributed;

namespace VlmTune.Data;

/// <summary>
/// Which samples make each iteration's micro-batch: per epoch a length-grouped (or plain) seeded order, cut into
/// batches of batch_size (the last one smaller). Deterministic from the seed, so a resumed run sees the same batches.
/// </summary>
public sealed class BatchPlan
{
    private readonly TrainDataset _dataset;
    private readonly int _batchSize, _rank, _worldSize;
    private readonly long _seed;
    private readonly bool _groupByLength;
    private int _cachedEpoch = -1;
    private long[] _order = [];

    /// <param name="batchSize">Samples per rank per micro-batch (config batch_size).</param>
    /// <param name="rank">This data-parallel rank; the global batch is batchSize × worldSize.</param>
    public BatchPlan(TrainDataset dataset, int batchSize, long seed, bool groupByLength, int rank = 0, int worldSize = 1)
    {
        _dataset = dataset; _batchSize = batchSize; _seed = seed; _groupByLength = groupByLength; _rank = rank; _worldSize = worldSize;
        BatchesPerEpoch = DistributedSampler.StepCount(dataset.Samples.Count, worldSize, batchSize);
    }

    public long BatchesPerEpoch { get; }

    /// <summary>This rank's samples of micro-batch <paramref name="iteration"/> (possibly fewer than batch_size, or none, at an epoch's end).</summary>
    public (int Epoch, long[] Samples) Batch(long iteration)
    {
        int epoch = (int)(iteration / BatchesPerEpoch);
        long inEpoch = iteration % BatchesPerEpoch;
        lock (this)
        {
            if (epoch != _cachedEpoch)
            {
                // Every rank computes the same global order; mega-batches are sized for the global batch, as XTuner's
                // sampler sizes them, so N ranks × B see exactly what one process with N·B sees.
                _order = _groupByLength
                    ? LengthGroupedSampler.Order(_dataset.Lengths, _batchSize * _worldSize, _seed, epoch)
                    : LengthGroupedSampler.Shuffled(_dataset.Samples.Count, _seed, epoch);
                _cachedEpoch = epoch;
            }
            return (epoch, DistributedSampler.RankBatch(_order, inEpoch, _rank, _worldSize, _batchSize));
        }
    }
}
