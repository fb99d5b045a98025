using VlmTune.Distributed;

namespace VlmTune.Tests.Distributed;

public class ZeroPartitionTests
{
    // Shapes like LoRA on a small InternLM2: per layer wqkv/wo/w1/w2/w3 A and B, plus a projector.
    private static List<(string Name, long Numel)> LoraLikeParameters()
    {
        var list = new List<(string, long)>();
        for (var layer = 0; layer < 24; layer++)
            foreach (var (m, outDim) in new[] { ("wqkv", 4096L), ("wo", 2048L), ("w1", 8192L), ("w2", 2048L), ("w3", 8192L) })
            {
                list.Add(($"layers.{layer}.{m}.lora_A", 64 * 2048));
                list.Add(($"layers.{layer}.{m}.lora_B", outDim * 64));
            }
        list.Add(("mlp1.1.weight", 4096L * 2048));
        list.Add(("mlp1.3.weight", 2048L * 2048));
        return list;
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(4)]
    [InlineData(8)]
    public void EveryParameterHasExactlyOneOwnerAndLoadsAreBalanced(int world)
    {
        var parameters = LoraLikeParameters();
        var plan = ZeroPartition.Plan(parameters, world);
        var owned = Enumerable.Range(0, world).SelectMany(plan.ParametersOf).ToList();
        Assert.Equal(parameters.Select(p => p.Name).Order(), owned.Order());
        Assert.Equal(parameters.Sum(p => p.Numel), plan.Load.Sum());
        for (var r = 0; r < world; r++)
            Assert.Equal(plan.ParametersOf(r).Sum(n => parameters.First(p => p.Name == n).Numel), plan.Load[r]);
        // The largest tensor (8.4M of 51M) bounds what greedy can do at 8 ranks; 1.1 still holds.
        Assert.True(plan.Imbalance <= 1.1, $"max/min load {plan.Imbalance:0.###} at {world} ranks");
    }

    [Fact]
    public void PlanIsDeterministicAndIndependentOfListOrder()
    {
        var parameters = LoraLikeParameters();
        var a = ZeroPartition.Plan(parameters, 4);
        var shuffled = parameters.OrderBy(p => p.Name.GetHashCode(StringComparison.Ordinal) ^ 12345).ToList();
        var b = ZeroPartition.Plan(shuffled, 4);
        Assert.Equal(a.Owner.OrderBy(kv => kv.Key), b.Owner.OrderBy(kv => kv.Key));
    }

    [Fact]
    public void GreedyPutsLargestFirstOnLeastLoadedRank()
    {
        var plan = ZeroPartition.Plan([("a", 5), ("b", 4), ("c", 3), ("d", 3), ("e", 1)], 2);
        // 5→r0, 4→r1, 3(c)→r1 (4<5), 3(d)→r0 (5<7), 1→r1 (7<8)... loads r0=8, r1=8
        Assert.Equal([8L, 8L], plan.Load);
        Assert.Equal(["a", "d"], plan.ParametersOf(0));
        Assert.Equal(["b", "c", "e"], plan.ParametersOf(1));
        Assert.Equal(1.0, plan.Imbalance);
    }

    [Fact]
    public void MoreRanksThanParametersLeavesSomeEmpty()
    {
        var plan = ZeroPartition.Plan([("a", 5)], 3);
        Assert.Equal(["a"], plan.ParametersOf(0));
        Assert.Empty(plan.ParametersOf(2));
        Assert.Equal(double.PositiveInfinity, plan.Imbalance);
    }

    [Fact]
    public void RejectsDuplicateNames() =>
        Assert.Throws<ArgumentException>(() => ZeroPartition.Plan([("a", 1), ("a", 2)], 2));
}
