using VlmTune.Distributed;

namespace VlmTune.Tests.Distributed;

public class LauncherTests
{
    private static Dictionary<string, string?> Env(params (string, string)[] vars) => vars.ToDictionary(v => v.Item1, v => (string?)v.Item2);

    [Fact]
    public void OneNodeGetsTorchrunVariablesAndOneGpuPerRank()
    {
        var env = Launcher.ChildEnvironment(1, 2, Env(), freePort: 40123);
        Assert.Equal("1", env["RANK"]);
        Assert.Equal("2", env["WORLD_SIZE"]);
        Assert.Equal("1", env["LOCAL_RANK"]);
        Assert.Equal("2", env["LOCAL_WORLD_SIZE"]);
        Assert.Equal("127.0.0.1", env["MASTER_ADDR"]);
        Assert.Equal("40123", env["MASTER_PORT"]);
        Assert.Equal("1", env["CUDA_VISIBLE_DEVICES"]);
        Assert.Equal("1", env[RuntimeSwitches.GpuIsolatedVariable]);
        // The variables the launcher sets are what the ranks parse.
        var parsed = DistributedEnvironment.FromEnvironment(env);
        Assert.Equal((1, 2, 1, 0, 1), (parsed.Rank, parsed.WorldSize, parsed.LocalRank, parsed.NodeRank, parsed.NodeCount));
    }

    [Fact]
    public void VisibleGpusAreDealtInOrder()
    {
        var env = Launcher.ChildEnvironment(1, 2, Env(("CUDA_VISIBLE_DEVICES", "4, 6")), 1);
        Assert.Equal("6", env["CUDA_VISIBLE_DEVICES"]);
        var e = Assert.Throws<DistributedException>(() => Launcher.ChildEnvironment(0, 4, Env(("CUDA_VISIBLE_DEVICES", "0,1")), 1));
        Assert.Contains("lists 2 GPU(s)", e.Message);
    }

    [Fact]
    public void SecondNodeOffsetsRanksAndNeedsTheMasterAddress()
    {
        var env = Launcher.ChildEnvironment(3, 4, Env(("NNODES", "2"), ("NODE_RANK", "1"), ("MASTER_ADDR", "node0"), ("MASTER_PORT", "29400")), 1);
        Assert.Equal("7", env["RANK"]);
        Assert.Equal("8", env["WORLD_SIZE"]);
        Assert.Equal("node0", env["MASTER_ADDR"]);
        Assert.Equal("29400", env["MASTER_PORT"]);
        var e = Assert.Throws<DistributedException>(() => Launcher.ChildEnvironment(0, 4, Env(("NNODES", "2"), ("NODE_RANK", "1")), 1));
        Assert.Contains("MASTER_ADDR", e.Message);
        Assert.Throws<DistributedException>(() => Launcher.ChildEnvironment(0, 4, Env(("NNODES", "2"), ("NODE_RANK", "2"), ("MASTER_ADDR", "x")), 1));
    }

    [Fact]
    public void RanksAreStartedWithoutTheLauncherOption()
    {
        Assert.Equal(["train", "c.yaml", "--zero", "1"], Launcher.WithoutLauncherOptions(["train", "c.yaml", "--nproc-per-node", "4", "--zero", "1"]));
        Assert.Equal(["train", "c.yaml"], Launcher.WithoutLauncherOptions(["train", "--nproc-per-node=2", "c.yaml"]));
    }
}

public class GpuMemoryMonitorIndexTests
{
    [Theory]
    [InlineData(0, null, 0)]
    [InlineData(0, "3", 3)]
    [InlineData(1, "2,5", 5)]
    [InlineData(0, "GPU-8f3c", 0)]
    [InlineData(2, "1", 2)]
    public void CudaOrdinalMapsToTheVisibleGpusNvmlIndex(int ordinal, string? visible, int expected) =>
        Assert.Equal(expected, VlmTune.Diagnostics.GpuMemoryMonitor.NvmlIndex(ordinal, visible ?? ""));

    [Theory]
    [InlineData("backend:cudaMallocAsync", true)]
    [InlineData("expandable_segments:True,backend:cudaMallocAsync", true)]
    [InlineData("backend: cudaMallocAsync", true)]
    [InlineData("backend:native", false)]
    [InlineData("expandable_segments:True", false)]
    [InlineData("", false)]
    public void AllocatorPeakIsReadFromThePoolOnlyUnderTheAsyncBackend(string conf, bool expected) =>
        Assert.Equal(expected, VlmTune.Diagnostics.GpuMemoryMonitor.UsesAsyncAllocator(conf));
}
