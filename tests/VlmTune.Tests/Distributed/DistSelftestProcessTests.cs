using VlmTune.Tests.Support;

namespace VlmTune.Tests.Distributed;

/// <summary>The rendezvous, sampler and ZeRO-1 plan across real processes: `vlmtune dist-selftest` started once per rank.</summary>
public class DistSelftestProcessTests
{
    private static CliProcess StartRank(int rank, int world, int port, params string[] extra) =>
        CliProcess.Start(["dist-selftest", "--timeout-seconds", "20", .. extra], new Dictionary<string, string>
        {
            ["RANK"] = rank.ToString(), ["WORLD_SIZE"] = world.ToString(), ["LOCAL_RANK"] = rank.ToString(),
            ["MASTER_ADDR"] = "127.0.0.1", ["MASTER_PORT"] = port.ToString(),
        });

    private static string Line(string stdout, string prefix) =>
        stdout.Split('\n').Select(l => l.Trim()).Single(l => l.StartsWith(prefix, StringComparison.Ordinal))[prefix.Length..];

    [Fact]
    public async Task ThreeProcessesAgreeOnIdAndSplitTheWork()
    {
        const int world = 3;
        var port = TcpRendezvousTests.FreePort();
        var ranks = Enumerable.Range(0, world).Select(r => StartRank(r, world, port)).ToList();
        try
        {
            foreach (var p in ranks)
                Assert.True(await p.WaitAsync(60) == 0, $"stdout:\n{p.Stdout}\nstderr:\n{p.Stderr}");
            Assert.All(ranks, p => Assert.Contains("done", p.Stdout));

            var ids = ranks.Select(p => Line(p.Stdout, "rank ").Split(" id ")[1]).Distinct().ToList();
            Assert.Single(ids);

            // 23 samples, 3 ranks × 2 per step: 4 steps, the last one of 5 samples; shards disjoint, together all 23.
            var shards = ranks.Select(p => Line(p.Stdout, "shard ").Split(',').Select(long.Parse).ToList()).ToList();
            Assert.Equal([8, 8, 7], shards.Select(s => s.Count));
            Assert.Equal(23, shards.SelectMany(s => s).Distinct().Count());
            Assert.All(ranks, p => Assert.Equal("6", Line(p.Stdout, "allreduce ")));

            var owned = ranks.SelectMany(p => Line(p.Stdout, "zero ").Split(',', StringSplitOptions.RemoveEmptyEntries)).ToList();
            Assert.Equal(Enumerable.Range(0, 10).Select(i => $"p{i}").Order(), owned.Order());
        }
        finally { foreach (var p in ranks) p.Dispose(); }
    }

    [Fact]
    public async Task SlurmLaunchedRanksFindTheMasterFromTheNodeList()
    {
        var port = TcpRendezvousTests.FreePort();
        var ranks = Enumerable.Range(0, 2).Select(r => CliProcess.Start(["dist-selftest", "--timeout-seconds", "20"], new Dictionary<string, string>
        {
            ["SLURM_PROCID"] = r.ToString(), ["SLURM_NTASKS"] = "2", ["SLURM_LOCALID"] = r.ToString(), ["SLURM_NODEID"] = "0",
            ["SLURM_NNODES"] = "1", ["SLURM_JOB_NODELIST"] = "localhost", ["MASTER_PORT"] = port.ToString(),
        })).ToList();
        try
        {
            foreach (var p in ranks)
                Assert.True(await p.WaitAsync(60) == 0, $"stdout:\n{p.Stdout}\nstderr:\n{p.Stderr}");
            Assert.Contains("rank 1/2 local 1", ranks[1].Stdout);
            Assert.Contains("done", ranks[1].Stdout);
        }
        finally { foreach (var p in ranks) p.Dispose(); }
    }

    [Fact]
    public async Task KilledRankEndsTheOthersWithItsName()
    {
        const int world = 3;
        var port = TcpRendezvousTests.FreePort();
        var ranks = Enumerable.Range(0, world).Select(r => r == 1 ? StartRank(r, world, port, "--hang-after-ready") : StartRank(r, world, port)).ToList();
        try
        {
            Assert.True(await ranks[1].WaitForOutputAsync("ready", 60), ranks[1].Stderr);
            ranks[1].Kill(); // SIGKILL: no cleanup; the kernel closes its socket
            foreach (var r in new[] { 0, 2 })
            {
                Assert.Equal(1, await ranks[r].WaitAsync(30));
                Assert.Contains("rank 1 disconnected", ranks[r].Stderr);
            }
        }
        finally { foreach (var p in ranks) p.Dispose(); }
    }
}
