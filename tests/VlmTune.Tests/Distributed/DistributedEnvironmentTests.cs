using System.Collections;
using VlmTune.Distributed;

namespace VlmTune.Tests.Distributed;

public class DistributedEnvironmentTests
{
    private static Hashtable Env(params (string, string)[] vars)
    {
        var h = new Hashtable();
        foreach (var (k, v) in vars) h[k] = v;
        return h;
    }

    [Fact]
    public void NoLauncherVariablesMeansOneProcess()
    {
        var env = DistributedEnvironment.FromEnvironment(Env(("PATH", "/bin")));
        Assert.Equal(DistributedEnvironment.Single, env);
        Assert.False(env.IsDistributed);
    }

    [Fact]
    public void ReadsTorchrunVariables()
    {
        var env = DistributedEnvironment.FromEnvironment(Env(
            ("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "4"),
            ("NNODES", "2"), ("NODE_RANK", "1"), ("MASTER_ADDR", "node0"), ("MASTER_PORT", "29600")));
        Assert.Equal(new DistributedEnvironment(5, 8, 1, 4, 1, 2, "node0", 29600, "torchrun variables"), env);
        Assert.True(env.IsDistributed);
        Assert.False(env.IsMaster);
    }

    [Fact]
    public void DerivesLocalRankAndNodeFromNprocPerNode()
    {
        var env = DistributedEnvironment.FromEnvironment(Env(
            ("RANK", "6"), ("WORLD_SIZE", "8"), ("NPROC_PER_NODE", "4"), ("MASTER_ADDR", "10.0.0.1")));
        Assert.Equal(2, env.LocalRank);
        Assert.Equal(4, env.LocalWorldSize);
        Assert.Equal(1, env.NodeRank);
        Assert.Equal(2, env.NodeCount);
        Assert.Equal(DistributedEnvironment.DefaultMasterPort, env.MasterPort);
    }

    [Fact]
    public void ReadsSlurmVariablesWithMasterFromNodeList()
    {
        var env = DistributedEnvironment.FromEnvironment(Env(
            ("SLURM_PROCID", "3"), ("SLURM_NTASKS", "4"), ("SLURM_LOCALID", "1"), ("SLURM_NODEID", "1"),
            ("SLURM_NNODES", "2"), ("SLURM_JOB_NODELIST", "gpu[07-09,12]")));
        Assert.Equal(new DistributedEnvironment(3, 4, 1, 2, 1, 2, "gpu07", 29500, "Slurm variables"), env);
    }

    [Fact]
    public void TorchrunVariablesWinOverSlurm()
    {
        var env = DistributedEnvironment.FromEnvironment(Env(
            ("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"),
            ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")));
        Assert.Equal("torchrun variables", env.Source);
        Assert.Equal(1, env.Rank);
    }

    [Theory]
    [InlineData("gpu01", "gpu01")]
    [InlineData("gpu01,gpu02", "gpu01")]
    [InlineData("gpu[3-5,7]", "gpu3")]
    [InlineData("node[001-004]-ib", "node001-ib")]
    [InlineData("a[1-2],b3", "a1")]
    [InlineData("x1,a[2-3]", "x1")]
    public void FirstHostOfSlurmNodeList(string list, string expected) =>
        Assert.Equal(expected, DistributedEnvironment.FirstHost(list));

    [Fact]
    public void ReportsEveryBadVariableByName()
    {
        var e = Assert.Throws<DistributedException>(() => DistributedEnvironment.FromEnvironment(Env(
            ("RANK", "4"), ("WORLD_SIZE", "4"), ("MASTER_PORT", "99999"), ("LOCAL_RANK", "x"))));
        Assert.Contains("RANK=4 must be below WORLD_SIZE=4", e.Message);
        Assert.Contains("MASTER_ADDR is missing", e.Message);
        Assert.Contains("MASTER_PORT=99999", e.Message);
        Assert.Contains("LOCAL_RANK='x'", e.Message);
    }

    [Fact]
    public void ReportsMissingWorldSize()
    {
        var e = Assert.Throws<DistributedException>(() => DistributedEnvironment.FromEnvironment(Env(("RANK", "0"))));
        Assert.Contains("WORLD_SIZE is missing", e.Message);
    }

    [Fact]
    public void ReportsBadSlurmVariables()
    {
        var e = Assert.Throws<DistributedException>(() => DistributedEnvironment.FromEnvironment(Env(
            ("SLURM_PROCID", "2"), ("SLURM_NTASKS", "2"), ("SLURM_JOB_NODELIST", "gpu[a-b]"))));
        Assert.Contains("SLURM_PROCID=2 must be below SLURM_NTASKS=2", e.Message);
        Assert.Contains("SLURM_JOB_NODELIST='gpu[a-b]'", e.Message);
    }
}
