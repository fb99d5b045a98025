using System.CommandLine;
using System.Security.Cryptography;
using VlmTune.Distributed;

namespace VlmTune.Cli.Commands;

/// <summary>
/// <c>vlmtune dist-selftest</c>: one rank of a CPU-only distributed check, started N times with the launcher
/// variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT or Slurm's). It joins the TCP rendezvous, receives rank 0's
/// 128-byte id, sums a value over ranks, passes a barrier, and prints its sampler shard and ZeRO-1 parameters so a test can check them together.
/// </summary>
internal static class DistSelftestCommand
{
    private static readonly Option<int> TimeoutSeconds = new("--timeout-seconds") { Description = "Rendezvous and barrier timeout.", DefaultValueFactory = _ => 30 };
    private static readonly Option<int> Samples = new("--samples") { Description = "Size of the synthetic dataset to shard.", DefaultValueFactory = _ => 23 };
    private static readonly Option<int> Batch = new("--per-rank-batch") { Description = "Samples per rank per step.", DefaultValueFactory = _ => 2 };
    private static readonly Option<bool> Nccl = new("--nccl") { Description = "Also all-reduce on this rank's GPU through NCCL (run each rank with CUDA_VISIBLE_DEVICES set to its GPU): check the sum and time the bus bandwidth." };
    private static readonly Option<long> NcclBytes = new("--nccl-bytes") { Description = "Size of the timed all-reduce.", DefaultValueFactory = _ => 256L << 20 };
    private static readonly Option<bool> HangAfterReady = new("--hang-after-ready") { Description = "Test aid: print 'ready' then wait forever instead of entering the barrier." };

    public static Command Create()
    {
        var command = new Command("dist-selftest", "Diagnose a distributed setup: run it once per rank with the launcher variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT or Slurm's) to check the rendezvous, sampler and ZeRO-1 plan, and with --nccl the GPUs' all-reduce.")
        {
            TimeoutSeconds, Samples, Batch, HangAfterReady, Nccl, NcclBytes,
        };
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
        int batch = parse.GetValue(Batch);
        var shard = Enumerable.Range(0, (int)DistributedSampler.StepCount(order.Length, env.WorldSize, batch))
            .SelectMany(step => DistributedSampler.RankBatch(order, step, env.Rank, env.WorldSize, batch));
        Console.WriteLine($"shard {string.Join(",", shard)}");
        Console.WriteLine($"allreduce {rdv.AllReduceSum([env.Rank + 1.0, 0.5])[0]}");

        var parameters = Enumerable.Range(0, 10).Select(i => ($"p{i}", (long)(i + 1) * 100)).ToList();
        var plan = ZeroPartition.Plan(parameters, env.WorldSize);
        Console.WriteLine($"zero {string.Join(",", plan.ParametersOf(env.Rank))}");
        Console.WriteLine("ready");
        Console.Out.Flush();

        if (parse.GetValue(HangAfterReady)) Thread.Sleep(Timeout.Infinite);
        if (parse.GetValue(Nccl)) NcclCheck(env, rdv, parse.GetValue(NcclBytes));
        rdv.Barrier();
        Console.WriteLine("done");
        return 0;
    }

    /// <summary>Sum of (rank + 1) over all ranks must come back on every rank; then the bus bandwidth of a large all-reduce.</summary>
    private static void NcclCheck(DistributedEnvironment env, TcpRendezvous rdv, long bytes)
    {
        var device = new TorchSharp.torch.Device(TorchSharp.DeviceType.CUDA, 0);   // CUDA_VISIBLE_DEVICES picks the GPU
        using var warm = TorchSharp.torch.zeros(1, device: device);                // creates the CUDA context before NCCL
        var nccl = NcclLibrary.Load();
        var id = rdv.Broadcast(env.IsMaster ? nccl.NewUniqueId() : null);
        using var comm = new NcclCommunicator(nccl, id, env.Rank, env.WorldSize);
        using var value = TorchSharp.torch.full(new long[] { 1 << 20 }, (float)(env.Rank + 1), device: device);
        comm.AllReduce(value);
        float expected = env.WorldSize * (env.WorldSize + 1) / 2f;
        using var cpu = value.cpu();
        bool ok = cpu.eq(expected).all().item<bool>();
        using var big = TorchSharp.torch.zeros(new long[] { bytes / 2 }, TorchSharp.torch.ScalarType.BFloat16, device);
        for (int i = 0; i < 3; i++) comm.AllReduce(big);
        TorchSharp.torch.cuda.synchronize(device);
        const int iterations = 10;
        var clock = System.Diagnostics.Stopwatch.StartNew();
        for (int i = 0; i < iterations; i++) comm.AllReduce(big);
        TorchSharp.torch.cuda.synchronize(device);
        double seconds = clock.Elapsed.TotalSeconds / iterations;
        double busBandwidth = 2.0 * (env.WorldSize - 1) / env.WorldSize * bytes / seconds / 1e9;
        Console.WriteLine($"nccl rank {env.Rank}: sum {(ok ? "ok" : "WRONG")} ({cpu[0].item<float>()} vs {expected}); all-reduce {bytes >> 20} MiB bf16 in {seconds * 1000:F2} ms, bus bandwidth {busBandwidth:F1} GB/s");
        if (!ok) throw new DistributedException($"rank {env.Rank}: NCCL all-reduce gave {cpu[0].item<float>()}, expected {expected}.");
    }
}
