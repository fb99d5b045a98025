using System.Text.Json;
using VlmTune.Checkpoints;
using VlmTune.Tests.Support;
using VlmTune.Tests.Training;
using VlmTune.Training;

namespace VlmTune.Tests.Distributed;

/// <summary>
/// Data-parallel training end to end on CPU: `vlmtune train --nproc-per-node 2` as real processes (the launcher, the
/// TCP rendezvous, the distributed sampler, gradient reduction, ZeRO-1, rank-0 checkpoints, failure handling) against
/// the same global batch in one process.
/// </summary>
public class DataParallelTrainingTests
{
    private static string WriteConfig(TrainTestData data, string name, params string[] overrides)
    {
        var config = data.Config(["max_steps=6", "log_interval=1", "warmup_ratio=0.0", "lr=0.01", .. overrides]);
        string path = Path.Combine(data.Dir, name + ".yaml");
        File.WriteAllText(path, config.Resolved().ToYaml());
        return path;
    }

    private static async Task<(int Code, string Out, string Err)> Train(string config, string workDir, int nproc, params string[] extra)
    {
        var args = new List<string> { "train", config, "--set", $"work_dir={workDir}" };
        if (nproc > 1) args.AddRange(["--nproc-per-node", nproc.ToString()]);
        args.AddRange(extra);
        return await CliProcess.RunAsync(args, timeoutSeconds: 180);
    }

    private static List<(double Loss, double? GradNorm)> Scalars(string workDir, int run = 0)
    {
        var file = Directory.GetFiles(workDir, "scalars.json", SearchOption.AllDirectories).Order().ElementAt(run);
        return File.ReadAllLines(file).Select(l => JsonDocument.Parse(l).RootElement)
            .Select(e => (e.GetProperty("loss").GetDouble(), e.GetProperty("grad_norm").ValueKind == JsonValueKind.Null ? (double?)null : e.GetProperty("grad_norm").GetDouble()))
            .ToList();
    }

    private static void AssertClose(IReadOnlyList<(double Loss, double? GradNorm)> expected, IReadOnlyList<(double Loss, double? GradNorm)> actual, string what)
    {
        Assert.Equal(expected.Count, actual.Count);
        for (int i = 0; i < expected.Count; i++)
        {
            Assert.True(Math.Abs(expected[i].Loss - actual[i].Loss) <= 1e-4 * Math.Abs(expected[i].Loss), $"{what}: iteration {i + 1} loss {actual[i].Loss} vs {expected[i].Loss}");
            Assert.True(Math.Abs(expected[i].GradNorm!.Value - actual[i].GradNorm!.Value) <= 1e-3 * expected[i].GradNorm!.Value,
                $"{what}: iteration {i + 1} grad norm {actual[i].GradNorm} vs {expected[i].GradNorm}");
        }
    }

    private static double MaxAdapterDifference(string a, string b)
    {
        using var fa = SafetensorsFile.Open(Path.Combine(a, PeftAdapter.WeightsFile));
        using var fb = SafetensorsFile.Open(Path.Combine(b, PeftAdapter.WeightsFile));
        Assert.Equal(fa.Entries.Keys.Order(), fb.Entries.Keys.Order());
        double max = 0;
        foreach (var name in fa.Entries.Keys)
        {
            using var x = fa.Read(name);
            using var y = fb.Read(name);
            max = Math.Max(max, (x - y).abs().max().item<float>());
        }
        return max;
    }

    [FixtureFact]
    public async Task TwoAndFourProcessesAndZeroOneFollowTheSingleProcessRunWithTheSameGlobalBatch()
    {
        using var data = new TrainTestData(samples: 12);
        string single = WriteConfig(data, "single", "batch_size=4"), pair = WriteConfig(data, "pair", "batch_size=2"), quad = WriteConfig(data, "quad", "batch_size=1");
        string w1 = Path.Combine(data.Dir, "w1"), w2 = Path.Combine(data.Dir, "w2"), wz = Path.Combine(data.Dir, "wz"), w4 = Path.Combine(data.Dir, "w4");

        var r1 = await Train(single, w1, 1);
        Assert.True(r1.Code == 0, r1.Err + r1.Out);
        var r2 = await Train(pair, w2, 2);
        Assert.True(r2.Code == 0, r2.Err + r2.Out);
        var rz = await Train(pair, wz, 2, "--zero", "1");
        Assert.True(rz.Code == 0, rz.Err + rz.Out);
        var r4 = await Train(quad, w4, 4, "--zero", "1");
        Assert.True(r4.Code == 0, r4.Err + r4.Out);

        Assert.Contains("launching 2 processes", r2.Err);
        Assert.Contains("data parallel: 2 ranks", r2.Out);
        Assert.Contains("zero-1: rank 0 keeps the optimizer state of", rz.Out);
        // One report for the job (rank 0's), not one per rank.
        Assert.Single(r2.Out.Split('\n'), l => l.StartsWith("done:", StringComparison.Ordinal));

        var expected = Scalars(w1);
        Assert.Equal(6, expected.Count);
        AssertClose(expected, Scalars(w2), "2 processes");
        AssertClose(expected, Scalars(wz), "2 processes, ZeRO-1");
        AssertClose(expected, Scalars(w4), "4 processes × batch 1, ZeRO-1");
        Assert.True(expected[^1].Loss < expected[0].Loss, "the run learns");
        Assert.True(MaxAdapterDifference(Path.Combine(w1, "iter_6"), Path.Combine(w2, "iter_6")) < 1e-4);
        Assert.True(MaxAdapterDifference(Path.Combine(w1, "iter_6"), Path.Combine(wz, "iter_6")) < 1e-4);
        // ZeRO-1: one optimizer shard per rank, no unsharded one.
        Assert.True(File.Exists(Path.Combine(wz, "iter_6", IterCheckpoint.OptimizerShardFile(0))));
        Assert.True(File.Exists(Path.Combine(wz, "iter_6", IterCheckpoint.OptimizerShardFile(1))));
        Assert.False(File.Exists(Path.Combine(wz, "iter_6", IterCheckpoint.OptimizerFile)));
        // Only rank 0 writes the run folder.
        Assert.Single(Directory.GetDirectories(w2), d => !Path.GetFileName(d).StartsWith("iter_", StringComparison.Ordinal));
    }

    [FixtureFact]
    public async Task EightBitStatesUnderZeroOneFollowTheSingleProcessRun()
    {
        // optim: adamw_8bit with ZeRO-1: each rank keeps the 8-bit states of the tensors it owns and writes them as its shard.
        using var data = new TrainTestData(samples: 12);
        string single = WriteConfig(data, "single8", "batch_size=4", "optim=adamw_8bit"), pair = WriteConfig(data, "pair8", "batch_size=2", "optim=adamw_8bit", "zero_stage=1");
        string w1 = Path.Combine(data.Dir, "w1"), wz = Path.Combine(data.Dir, "wz");
        var r1 = await Train(single, w1, 1);
        Assert.True(r1.Code == 0, r1.Err + r1.Out);
        var rz = await Train(pair, wz, 2);
        Assert.True(rz.Code == 0, rz.Err + rz.Out);
        Assert.Contains("zero-1: rank 0 keeps the optimizer state of", rz.Out);
        Assert.Contains("optimizer: adamw_8bit, 8-bit block-wise AdamW states", rz.Out);

        var expected = Scalars(w1);
        AssertClose(expected, Scalars(wz), "2 processes, ZeRO-1, 8-bit states");
        Assert.True(expected[^1].Loss < expected[0].Loss, "the run learns");
        // The reduction's order moves a gradient by an ulp, which now and then puts a moment on the other side of a
        // code's midpoint: the adapters agree to the size of such a code step's effect, not to fp32 rounding.
        double adapters = MaxAdapterDifference(Path.Combine(w1, "iter_6"), Path.Combine(wz, "iter_6"));
        Assert.True(adapters < 2e-3, $"adapters differ by {adapters}");
        for (int rank = 0; rank < 2; rank++)
            Assert.True(AdamW8bit.IsStateFile(Path.Combine(wz, "iter_6", IterCheckpoint.OptimizerShardFile(rank))), $"rank {rank}'s shard");
        Assert.True(AdamW8bit.IsStateFile(Path.Combine(w1, "iter_6", IterCheckpoint.OptimizerFile)));
    }

    [FixtureFact]
    public async Task TwoProcessesWithPackedRowsFollowTheSingleProcessUnpackedRun()
    {
        // Unsorted batches mix image and text-only samples, so each rank's two samples often share one row.
        using var data = new TrainTestData(samples: 12);
        string single = WriteConfig(data, "single", "batch_size=4", "group_by_length=false", "accumulative_counts=2");
        string packed = WriteConfig(data, "packed", "batch_size=2", "group_by_length=false", "accumulative_counts=2", "pack_to_max_length=true");
        string w1 = Path.Combine(data.Dir, "w1"), w2 = Path.Combine(data.Dir, "w2");

        var r1 = await Train(single, w1, 1);
        Assert.True(r1.Code == 0, r1.Err + r1.Out);
        var r2 = await Train(packed, w2, 2);
        Assert.True(r2.Code == 0, r2.Err + r2.Out);
        Assert.Contains("packing: the 2 samples of each micro-batch share rows", r2.Out);
        Assert.Contains("packed rows: 1", r2.Out);

        var expected = Scalars(w1);
        AssertClose(expected.Skip(1).ToList(), Scalars(w2).Skip(1).ToList(), "2 processes, packed");   // iteration 1 precedes the first step
        Assert.True(Math.Abs(expected[0].Loss - Scalars(w2)[0].Loss) <= 1e-4 * expected[0].Loss);
        Assert.True(MaxAdapterDifference(Path.Combine(w1, "iter_6"), Path.Combine(w2, "iter_6")) < 1e-4);
    }

    [FixtureFact]
    public async Task TwoProcessesEvaluateTheSameLossAsOne()
    {
        // Five eval samples over two ranks (3 + 2): the summed loss and token counts give the single process's token mean.
        using var data = new TrainTestData();
        string[] eval = ["max_steps=4", "save_steps=2", "eval_steps=2", $"eval_data={data.DataFile}", "eval_max_samples=5", "eval_generate=1", "eval_max_new_tokens=4"];
        string one = Path.Combine(data.Dir, "one"), two = Path.Combine(data.Dir, "two");
        var single = await Train(WriteConfig(data, "eval1", ["batch_size=4", .. eval]), one, 1);   // the same global batch
        Assert.True(single.Code == 0, single.Err);
        var pair = await Train(WriteConfig(data, "eval2", ["batch_size=2", .. eval]), two, 2);
        Assert.True(pair.Code == 0, pair.Err);
        static List<double> EvalLosses(string workDir) =>
            File.ReadAllLines(Directory.GetFiles(workDir, "scalars.json", SearchOption.AllDirectories).Single()).Select(l => JsonDocument.Parse(l).RootElement)
                .Where(e => e.TryGetProperty("eval_loss", out _)).Select(e => e.GetProperty("eval_loss").GetDouble()).ToList();
        var expected = EvalLosses(one);
        var actual = EvalLosses(two);
        Assert.Equal(2, expected.Count);
        Assert.Equal(2, actual.Count);
        // Training itself follows the single process to ~1e-4 (reduction order); so does the evaluation that follows it.
        for (int i = 0; i < 2; i++) Assert.True(Math.Abs(expected[i] - actual[i]) <= 1e-3 * expected[i], $"evaluation {i + 1}: {actual[i]} vs {expected[i]}");
        Assert.Contains("eval_samples: 5", pair.Out);
        Assert.Single(Directory.GetFiles(Path.Combine(two, "iter_4"), IterCheckpoint.EvalFile));
    }

    [FixtureFact]
    public async Task SlurmLaunchedRanksTrainTogetherAndOnlyRankZeroReports()
    {
        // srun starts every rank itself (no --nproc-per-node): the ranks must know they are ranks from SLURM_* alone.
        using var data = new TrainTestData();
        string config = WriteConfig(data, "slurm", "max_steps=2");
        string work = Path.Combine(data.Dir, "slurm-work");
        var port = TcpRendezvousTests.FreePort();
        var ranks = Enumerable.Range(0, 2).Select(r => CliProcess.Start(["train", config, "--set", $"work_dir={work}", "--nproc-per-node", "2"], new Dictionary<string, string>
        {
            ["SLURM_PROCID"] = r.ToString(), ["SLURM_NTASKS"] = "2", ["SLURM_LOCALID"] = r.ToString(), ["SLURM_NODEID"] = "0",
            ["SLURM_NNODES"] = "1", ["SLURM_JOB_NODELIST"] = "localhost", ["MASTER_PORT"] = port.ToString(),
        })).ToList();
        try
        {
            foreach (var p in ranks)
                Assert.True(await p.WaitAsync(180) == 0, $"stdout:\n{p.Stdout}\nstderr:\n{p.Stderr}");
            Assert.Contains("data parallel: 2 ranks (Slurm", ranks[0].Stdout);
            Assert.Contains("done: 2 iterations", ranks[0].Stdout);
            Assert.DoesNotContain("done:", ranks[1].Stdout);
            Assert.True(File.Exists(Path.Combine(work, "iter_2", IterCheckpoint.StateFile)));
        }
        finally { foreach (var p in ranks) p.Dispose(); }
    }

    [FixtureFact]
    public async Task ARankThatDiesEndsTheJobAndItsLastCheckpointResumesUnderZeroOne()
    {
        using var data = new TrainTestData(samples: 12);
        string config = WriteConfig(data, "zero", "batch_size=2", "save_steps=2", "save_total_limit=0", "zero_stage=1");
        string full = Path.Combine(data.Dir, "full"), crash = Path.Combine(data.Dir, "crash");

        var reference = await Train(config, full, 2);
        Assert.True(reference.Code == 0, reference.Err + reference.Out);

        var dead = await CliProcess.RunAsync(["train", config, "--set", $"work_dir={crash}", "--nproc-per-node", "2"],
            new Dictionary<string, string> { ["VLMTUNE_TEST_FAULT"] = "exit:1:3" }, timeoutSeconds: 120);
        Assert.Equal(7, dead.ExitCode);
        Assert.Contains("rank 1 exited with code 7", dead.Stderr);
        Assert.Contains("rank 1 disconnected", dead.Stderr);   // rank 0 noticed and named it
        Assert.True(File.Exists(Path.Combine(crash, "iter_2", IterCheckpoint.StateFile)));
        Assert.False(Directory.Exists(Path.Combine(crash, "iter_4")));
        Assert.Empty(Directory.GetDirectories(crash, ".iter_*"));

        var resumed = await Train(config, crash, 2, "--resume", "auto");
        Assert.True(resumed.Code == 0, resumed.Err + resumed.Out);
        Assert.Contains("resumed from", resumed.Out);
        var expected = Scalars(full).Skip(2).ToList();
        AssertClose(expected, Scalars(crash, run: 1), "resumed after a crash");
        Assert.True(MaxAdapterDifference(Path.Combine(full, "iter_6"), Path.Combine(crash, "iter_6")) < 1e-5);

        // Another world size would change the global batch: refused, naming it.
        var other = await Train(config, crash, 1, "--resume", "auto");
        Assert.NotEqual(0, other.Code);
        Assert.Contains("trained by 2 process(es)", other.Err + other.Out);
    }

    [FixtureFact]
    public async Task SigtermToTheLauncherStopsEveryRankAtTheSameIterationWithACheckpoint()
    {
        using var data = new TrainTestData(samples: 12);
        string config = WriteConfig(data, "stop", "batch_size=2", "max_steps=400", "save_steps=0");
        string work = Path.Combine(data.Dir, "stop");
        using var job = CliProcess.Start(["train", config, "--set", $"work_dir={work}", "--nproc-per-node", "2"]);
        Assert.True(await job.WaitForOutputAsync("Iter(train) [  3/400]", 120), job.Stdout + job.Stderr);
        job.Signal(15);
        int code = await job.WaitAsync(120);
        Assert.True(code == 130, $"exit {code}\n{job.Stdout}\n{job.Stderr}");
        Assert.DoesNotContain("error:", job.Stderr);
        Assert.Contains("interrupted after", job.Stdout);
        // Both ranks agreed on the stop: one checkpoint, complete, at an iteration both reached.
        var checkpoint = IterCheckpoint.Latest(work);
        Assert.NotNull(checkpoint);
        Assert.True(File.Exists(Path.Combine(checkpoint, IterCheckpoint.StateFile)));
        long stoppedAt = long.Parse(Path.GetFileName(checkpoint)["iter_".Length..]);
        Assert.InRange(stoppedAt, 3, 399);
        var resumed = await Train(config, work, 2, "--resume", "auto", "--set", $"max_steps={stoppedAt + 2}");
        Assert.True(resumed.Code == 0, resumed.Err + resumed.Out);
        Assert.Contains($"at iteration {stoppedAt}", resumed.Out);
    }

    [FixtureFact]
    public async Task AHungRankEndsTheJobWithinTheTimeout()
    {
        using var data = new TrainTestData(samples: 12);
        string config = WriteConfig(data, "hang", "batch_size=2", "save_steps=2", "dist_timeout_s=10");
        string work = Path.Combine(data.Dir, "hang");
        var hung = await CliProcess.RunAsync(["train", config, "--set", $"work_dir={work}", "--nproc-per-node", "2"],
            new Dictionary<string, string> { ["VLMTUNE_TEST_FAULT"] = "hang:1:3" }, timeoutSeconds: 120);
        Assert.NotEqual(0, hung.ExitCode);
        Assert.Contains("rank(s) 1 of 2 did not arrive", hung.Stderr);
        Assert.Contains("stopping the other ranks", hung.Stderr);
        Assert.True(File.Exists(Path.Combine(work, "iter_2", IterCheckpoint.StateFile)));
    }
}
