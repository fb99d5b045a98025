using VlmTune.Checkpoints;
using VlmTune.Tests.Data;
using VlmTune.Tests.Hub;
using VlmTune.Tests.Support;
using VlmTune.Tests.Training;
using VlmTune.Training;

namespace VlmTune.Tests.Cli;

/// <summary>
/// SIGTERM, SIGINT and SIGKILL against the long-running commands as real processes. VLMTUNE_TEST_PAUSE holds each one
/// at a point where its temporaries exist (no timing): a stop signal must end it with exit code 130, nothing at the
/// final path and no temporary left; after a kill the next run removes what was left.
/// </summary>
public sealed class StopSignalTests : IDisposable
{
    private const int Sigint = 2, Sigterm = 15;
    private readonly string _dir = Directory.CreateTempSubdirectory("vlmtune-signals-").FullName;

    public void Dispose()
    {
        try { Directory.Delete(_dir, true); } catch (IOException) { }
    }

    private static Dictionary<string, string> PauseAt(string point) => new() { ["VLMTUNE_TEST_PAUSE"] = point };

    private static async Task Paused(CliProcess cli, string point) =>
        Assert.True(await cli.WaitForOutputAsync($"VLMTUNE_TEST_PAUSE: {point}", 120), $"never paused at {point}.\nstdout:\n{cli.Stdout}\nstderr:\n{cli.Stderr}");

    private string[] MergeArgs(string outDir) => ["merge", "--base", Fixtures.TinyModel, "--adapter", Fixtures.Adapter, "--out", outDir];

    private IEnumerable<string> Leftovers() => Directory.EnumerateFileSystemEntries(_dir, ".*", SearchOption.AllDirectories)
        .Concat(Directory.EnumerateFileSystemEntries(_dir, "*.tmp-*", SearchOption.AllDirectories));

    [FixtureTheory]
    [InlineData(Sigterm)]
    [InlineData(Sigint)]
    public async Task MergeStopsCleanlyOnSigtermAndSigint(int signal)
    {
        string outDir = Path.Combine(_dir, "merged");
        using var cli = CliProcess.Start(MergeArgs(outDir), PauseAt("merge-shard"), defaultSigint: signal == Sigint);
        await Paused(cli, "merge-shard");
        var temp = Assert.Single(Directory.GetDirectories(_dir, ".merged.merge-tmp-*"));
        Assert.True(File.Exists(Path.Combine(temp, "model.safetensors")));   // a whole model's weights, written

        cli.Signal(signal);
        Assert.Equal(130, await cli.WaitAsync(120));
        Assert.Contains($"stopped by {(signal == Sigint ? "SIGINT" : "SIGTERM")}: the temporary folder was removed; nothing was written to {outDir}", cli.Stderr);
        Assert.DoesNotContain("   at ", cli.Stderr);   // no stack trace
        Assert.False(Directory.Exists(outDir));
        Assert.Empty(Leftovers());
    }

    [FixtureFact]
    public async Task AMergeKilledMidWriteLeavesATemporaryThatTheNextMergeRemoves()
    {
        string outDir = Path.Combine(_dir, "merged");
        using (var cli = CliProcess.Start(MergeArgs(outDir), PauseAt("merge-shard")))
        {
            await Paused(cli, "merge-shard");
            cli.Kill();
        }
        var temp = Assert.Single(Directory.GetDirectories(_dir, ".merged.merge-tmp-*"));

        var (code, stdout, stderr) = await CliProcess.RunAsync([.. MergeArgs(outDir), "--no-verify"], timeoutSeconds: 300);
        Assert.True(code == 0, stderr);
        Assert.Contains($"removed {temp}, left by an interrupted merge", stdout);
        Assert.False(Directory.Exists(temp));
        Assert.True(File.Exists(Path.Combine(outDir, "model.safetensors")));
    }

    [Fact]
    public async Task ConvertStopsCleanlyOnSigterm()
    {
        using var data = new TempDir();
        data.Jpeg("images/a.jpg", 8, 8);
        data.Write("cn.jsonl", string.Concat(Enumerable.Repeat("""{"type": "I2T", "question": null, "image": "a", "text": "梗"}""" + "\n", 3)));
        string output = data["ex.json"];
        using var cli = CliProcess.Start(["data", "convert-oogiri", "--input", data["cn.jsonl"], "--output", output], PauseAt("convert-record"));
        await Paused(cli, "convert-record");
        Assert.Single(Directory.GetFiles(data.Path, "ex.json.tmp-*"));

        cli.Signal(Sigterm);
        Assert.Equal(130, await cli.WaitAsync());
        Assert.Contains($"stopped by SIGTERM: nothing was written to {output}", cli.Stderr);
        Assert.False(File.Exists(output));
        Assert.Empty(Directory.GetFiles(data.Path, "*.tmp-*"));
    }

    [FixtureFact]
    public async Task DownloadStopsCleanlyOnSigtermKeepingThePartialForTheRerun()
    {
        await using var hub = await FakeHub.StartAsync();
        const string weights = "model.safetensors";
        var stall = hub.StallOnce(weights, 4_000_000);
        string local = Path.Combine(_dir, "download");
        string[] args = ["download", FakeHub.RepoId, "--local-dir", local, "--endpoint", hub.Endpoint];
        string[] WeightsPartial() => Directory.Exists(local) ? Directory.GetFiles(local, weights + ".*.incomplete", SearchOption.AllDirectories) : [];
        using (var cli = CliProcess.Start(args))
        {
            await stall.Reached.Task.WaitAsync(TimeSpan.FromSeconds(60));
            // The server has flushed the first bytes; stop once the client has written some of them, so there is a
            // partial to resume (under load the signal could otherwise land before the first write).
            for (int i = 0; i < 600 && !WeightsPartial().Any(f => new FileInfo(f).Length > 0); i++) await Task.Delay(100);
            cli.Signal(Sigterm);
            Assert.Equal(130, await cli.WaitAsync());
            Assert.Contains("stopped by SIGTERM: partial files stay", cli.Stderr);
        }
        Assert.False(File.Exists(Path.Combine(local, weights)));
        // The stalled weights' partial; a smaller file still downloading in parallel when the signal came keeps its
        // partial too (seen under load).
        Assert.Single(WeightsPartial());
        Assert.Empty(Directory.GetFiles(local, "*.tmp-*", SearchOption.AllDirectories));

        var (code, stdout, stderr) = await CliProcess.RunAsync(args);
        Assert.True(code == 0, stderr);
        Assert.Contains($"resuming {weights}", stdout);
        Assert.Equal(hub.File(weights).Bytes, File.ReadAllBytes(Path.Combine(local, weights)));
    }

    [FixtureFact]
    public async Task TrainingStopsOnSigtermWithACheckpointAndASecondSignalQuitsAtOnce()
    {
        using var data = new TrainTestData(samples: 4);
        string config = Path.Combine(data.Dir, "run.yaml");
        File.WriteAllText(config, data.Config("max_steps=400", "log_interval=1", "save_steps=0", "dataloader_num_workers=0").ToYaml());
        using (var cli = CliProcess.Start(["train", config]))
        {
            Assert.True(await cli.WaitForOutputAsync("Iter(train) [  2/400]", 120), cli.Stderr);
            cli.Signal(Sigterm);
            Assert.Equal(130, await cli.WaitAsync(120));
            Assert.Contains("SIGTERM: stopping: finishing the current iteration and saving a checkpoint", cli.Stderr);
        }
        var checkpoint = IterCheckpoint.Latest(data.WorkDir);
        Assert.NotNull(checkpoint);
        Assert.Empty(Directory.GetDirectories(data.WorkDir, ".iter_*"));

        // Held while saving a checkpoint, the first signal cannot stop the save; the second quits at once, leaving the
        // half-written checkpoint folder, which the next run removes.
        File.WriteAllText(config, data.Config("max_steps=2", "save_steps=1", "dataloader_num_workers=0", $"work_dir={Path.Combine(data.Dir, "w2")}").ToYaml());
        using (var cli = CliProcess.Start(["train", config], PauseAt("checkpoint")))
        {
            await Paused(cli, "checkpoint");
            cli.Signal(Sigterm);
            Assert.True(await cli.WaitForStderrAsync("SIGTERM: stopping"), cli.Stderr);
            cli.Signal(Sigterm);
            Assert.Equal(130, await cli.WaitAsync());
            Assert.Contains("SIGTERM again: quitting now", cli.Stderr);
        }
        string half = Assert.Single(Directory.GetDirectories(Path.Combine(data.Dir, "w2"), ".iter_1.tmp-*"));
        var (code, stdout, stderr) = await CliProcess.RunAsync(["train", config], timeoutSeconds: 180);
        Assert.True(code == 0, stderr);
        Assert.Contains($"removed {half}, left by an interrupted run", stdout);
        Assert.Empty(Directory.GetDirectories(Path.Combine(data.Dir, "w2"), ".iter_*"));
    }
}
