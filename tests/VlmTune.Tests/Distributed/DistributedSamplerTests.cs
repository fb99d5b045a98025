using VlmTune.Distributed;

namespace VlmTune.Tests.Distributed;

public class DistributedSamplerTests
{
    [Fact]
    public void EachGlobalBatchIsDealtRoundRobin()
    {
        long[] order = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19];
        // world 2 × batch 2 = 4 per step: [10..13], [14..17], [18, 19]
        Assert.Equal([10, 12], DistributedSampler.RankBatch(order, 0, 0, 2, 2));
        Assert.Equal([11, 13], DistributedSampler.RankBatch(order, 0, 1, 2, 2));
        Assert.Equal([14, 16], DistributedSampler.RankBatch(order, 1, 0, 2, 2));
        Assert.Equal([18], DistributedSampler.RankBatch(order, 2, 0, 2, 2));
        Assert.Equal([19], DistributedSampler.RankBatch(order, 2, 1, 2, 2));
        Assert.Equal(3, DistributedSampler.StepCount(order.Length, 2, 2));
    }

    [Theory]
    [InlineData(103, 4, 3)]
    [InlineData(96, 4, 3)]
    [InlineData(5, 8, 1)]
    [InlineData(1000, 3, 7)]
    public void RanksTogetherSeeExactlyTheSingleProcessBatches(int n, int world, int batch)
    {
        var order = Enumerable.Range(0, n).Select(i => (long)(i * 7919 % n)).ToArray(); // a permutation
        long steps = DistributedSampler.StepCount(n, world, batch);
        Assert.Equal(DistributedSampler.StepCount(n, 1, world * batch), steps);
        for (long step = 0; step < steps; step++)
        {
            var parts = Enumerable.Range(0, world).Select(r => DistributedSampler.RankBatch(order, step, r, world, batch)).ToList();
            Assert.All(parts, p => Assert.True(p.Length <= batch));
            var single = DistributedSampler.RankBatch(order, step, 0, 1, world * batch);
            Assert.Equal(single.Order(), parts.SelectMany(p => p).Order());
            // Balanced: rank loads differ by at most one sample.
            Assert.True(parts.Max(p => p.Length) - parts.Min(p => p.Length) <= 1);
        }
    }

    [Fact]
    public void OneRankKeepsTheOrder()
    {
        long[] order = [4, 2, 0, 1, 3];
        Assert.Equal([4, 2], DistributedSampler.RankBatch(order, 0, 0, 1, 2));
        Assert.Equal([3], DistributedSampler.RankBatch(order, 2, 0, 1, 2));
    }

    [Fact]
    public void RejectsBadArguments()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => DistributedSampler.RankBatch([1], 0, 2, 2, 1));
        Assert.Throws<ArgumentOutOfRangeException>(() => DistributedSampler.RankBatch([1], 0, 0, 1, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => DistributedSampler.RankBatch([1, 2], 1, 0, 1, 2));
    }
}
