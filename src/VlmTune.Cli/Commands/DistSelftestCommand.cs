using System.CommandLine;
using System.Security.Cryptography;
using VlmTune.Distributed;

namespace VlmTune.Cli.Commands;

/// <summary>
/// Hidden <c>vlmtune dist-selftest</c>: one rank of a CPU-only distributed check, started N times with the launcher
/// variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT or Slurm's). It joins the TCP rendezvous, receives rank 0's
/// 128-byte id, passes a barrier, and prints its sampler shard and ZeRO-1 parameters so a test can check them together.
/// </summary>
internal static class DistSelftestCommand
{
    private static readonly Option<int> TimeoutSeconds = new("--timeout-seconds") { Description = "Rendezvous and barrier timeout.", DefaultValueFactory = _ => 30 };
    private static readonly Option<int> Samples = new("--samples") { Description = "Size of the synthetic dataset to shard.", DefaultValueFactory = _ => 23 };
    private static readonly Option<int> Batch = new("--per-rank-batch") { Description = "Samples per rank per step.", DefaultValueFactory = _ => 2 };
    private static readonly Option<bool> HangAfterReady = new("--hang-after-ready") { Description = "Test aid: print 'ready' then wait forever instead of entering the barrier." };

    public static Command Create()
    {
        var command = new Command("dist-selftest", "Check the distributed rendezvous, sampler and ZeRO-1 plan across processes (CPU).")
        {
            TimeoutSeconds, Samples, Batch, HangAfterReady,
        };
        command.Hidden = true;
        command.SetAction((parse, ct) => CliErrors.RunAsync(() => Task.FromResult(Run(parse))));
        return command;
    }

    private static int Run(ParseResult parse)
    {
        var env = DistributedEnvironment.FromProcess();
        using var rdv = TcpRendezvous.Connect(env, TimeSpan.FromSeconds(parse.GetValue(TimeoutSeconds)));
        var id = rdv.Broadcast(env.IsMaster ? RandomNumberGenerator.GetBytes(128) : null);
        Console.WriteLine($"rank {env.Rank}/{env.WorldSize} local {env.LocalRank} id {Convert.ToHexString(SHA256.HashData(id))[..16]}");

        // Every rank derives the same global order from the same seed, as the trainer will.
        var order = Enumerable.Range(0, parse.GetValue(Samples)).Select(i => (long)i).ToArray();
        new Random(1234).Shuffle(order);
        var shard = DistributedSampler.Shard(order, env.Rank, env.WorldSize, parse.GetValue(Batch));
        Console.WriteLine($"shard {string.Join(",", shard)}");

        var parameters = Enumerable.Range(0, 10).Select(i => ($"p{i}", (long)(i + 1) * 100)).ToList();
        var plan = ZeroPartition.Plan(parameters, env.WorldSize);
        Console.WriteLine($"zero {string.Join(",", plan.ParametersOf(env.Rank))}");
        Console.WriteLine("ready");
        Console.Out.Flush();

        if (parse.GetValue(HangAfterReady)) Thread.Sleep(Timeout.Infinite);
        rdv.Barrier();
        Console.WriteLine("done");
        return 0;
    }
}
