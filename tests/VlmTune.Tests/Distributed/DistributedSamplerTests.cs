using VlmTune.Distributed;

namespace VlmTune.Tests.Distributed;

public class DistributedSamplerTests
{
    [Fact]
    public void EachStepsGlobalBatchIsSplitIntoContiguousSlices()
    {
        long[] order = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21];
        // world 2 × batch 2 = 4 per step: steps [10..13], [14..17], [18..21]
        Assert.Equal([10, 11, 14, 15, 18, 19], DistributedSampler.Shard(order, 0, 2, 2));
        Assert.Equal([12, 13, 16, 17, 20, 21], DistributedSampler.Shard(order, 1, 2, 2));
    }

    [Theory]
    [InlineData(103, 4, 3)]
    [InlineData(96, 4, 3)]
    [InlineData(5, 8, 1)]
    [InlineData(1000, 3, 7)]
    public void ShardsAreDisjointEqualAndCoverAllButTheTail(int n, int world, int batch)
    {
        var order = Enumerable.Range(0, n).Select(i => (long)(i * 7919 % n)).ToArray(); // a permutation
        var shards = Enumerable.Range(0, world).Select(r => DistributedSampler.Shard(order, r, world, batch)).ToList();
        var steps = n / (world * batch);
        Assert.All(shards, s => Assert.Equal(steps * batch, s.Length));
        var all = shards.SelectMany(s => s).ToList();
        Assert.Equal(all.Count, all.Distinct().Count());
        Assert.Equal(order.Take(steps * world * batch).Order(), all.Order());
        Assert.Equal(n % (world * batch), DistributedSampler.DroppedCount(n, world, batch));
        Assert.Equal(steps, DistributedSampler.StepCount(n, world, batch));
    }

    [Fact]
    public void OneRankKeepsTheOrderLessTheTail()
    {
        long[] order = [4, 2, 0, 1, 3];
        Assert.Equal([4, 2, 0, 1], DistributedSampler.Shard(order, 0, 1, 2));
    }

    [Fact]
    public void RejectsBadArguments()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => DistributedSampler.Shard([1], 2, 2, 1));
        Assert.Throws<ArgumentOutOfRangeException>(() => DistributedSampler.Shard([1], 0, 1, 0));
    }
}
