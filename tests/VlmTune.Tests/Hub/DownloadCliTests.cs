using VlmTune.Tests.Support;

namespace VlmTune.Tests.Hub;

/// <summary><c>vlmtune download</c> as a real process: exit codes, kill -9 and two processes on one folder.</summary>
public sealed class DownloadCliTests : IAsyncLifetime
{
    private const string Weights = "model.safetensors";
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "vlmtune-download-cli-" + Guid.NewGuid().ToString("N"));
    private FakeHub _hub = null!;

    public async Task InitializeAsync() => _hub = await FakeHub.StartAsync();

    public async Task DisposeAsync()
    {
        await _hub.DisposeAsync();
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    [FixtureFact]
    public async Task MissingRepoExitsNonZeroWithAClearMessage()
    {
        var (code, _, stderr) = await CliProcess.RunAsync(Args("test-org/does-not-exist"));
        Assert.Equal(1, code);
        Assert.StartsWith("error: Not found (HTTP 404): repository test-org/does-not-exist not found", stderr);
    }

    [FixtureFact]
    public async Task RerunAfterKill9ResumesWithARangeRequestAndLeavesNoPartialFile()
    {
        const long stallAt = 6_291_456;
        var stall = _hub.StallOnce(Weights, stallAt);
        using (var cli = CliProcess.Start(Args(FakeHub.RepoId)))
        {
            await stall.Reached.Task.WaitAsync(TimeSpan.FromSeconds(60));
            // The CLI writes unbuffered: wait until every byte sent before the stall is on disk, then kill it.
            var partial = Path.Combine(_dir, ".cache", "vlmtune", "download", $"{Weights}.{_hub.File(Weights).Sha256}.incomplete");
            for (var i = 0; i < 1500 && (!File.Exists(partial) || new FileInfo(partial).Length < stallAt); i++) await Task.Delay(20);
            cli.Kill();
            Assert.Equal(stallAt, new FileInfo(partial).Length);
        }
        Assert.False(File.Exists(Path.Combine(_dir, Weights)));

        var (code, stdout, stderr) = await CliProcess.RunAsync(Args(FakeHub.RepoId));
        Assert.True(code == 0, stderr);
        Assert.Contains($"resuming {Weights} at 6.0 MiB of 23.1 MiB", stdout);
        Assert.Contains($"{Weights}: 90% (", stdout); // big files log their progress in plain mode
        Assert.DoesNotContain($"{Weights}: 20% (", stdout); // ...from where the resume started
        Assert.Equal($"bytes={stallAt}-", _hub.Transfers(Weights).Last(r => r.Kind == "cdn").Range);
        Assert.Equal(_hub.File(Weights).Bytes, File.ReadAllBytes(Path.Combine(_dir, Weights)));
        Assert.Empty(Directory.EnumerateFiles(_dir, "*.incomplete", SearchOption.AllDirectories));
    }

    [FixtureFact]
    public async Task TwoProcessesDownloadingOneRepoEndWithOneIntactCopy()
    {
        var stall = _hub.StallOnce(Weights, 2_000_000);
        using var first = CliProcess.Start(Args(FakeHub.RepoId));
        using var second = CliProcess.Start(Args(FakeHub.RepoId));
        await stall.Reached.Task.WaitAsync(TimeSpan.FromSeconds(60));
        // One process holds the weights' lock (its transfer is stalled); the other must wait on that lock.
        var waitingLine = $"waiting: {Weights} is being downloaded by another process";
        var waited = await Task.WhenAny(first.WaitForOutputAsync(waitingLine), second.WaitForOutputAsync(waitingLine));
        Assert.True(await waited, $"neither process waited for the lock.\nfirst:\n{first.Stdout}\nsecond:\n{second.Stdout}");
        stall.Release.SetResult();

        Assert.Equal(0, await first.WaitAsync());
        Assert.Equal(0, await second.WaitAsync());
        foreach (var file in _hub.Files)
        {
            Assert.Equal(file.Bytes, File.ReadAllBytes(Path.Combine(_dir, file.Path)));
            Assert.Single(_hub.Requests, r => r.Kind == "resolve" && r.File == file.Path); // fetched once in all
        }
        Assert.Empty(Directory.EnumerateFiles(_dir, "*.incomplete", SearchOption.AllDirectories));
        Assert.Contains($"{FakeHub.RepoId} ({FakeHub.Commit}): 9 files, 24.5 MiB in {_dir}", second.Stdout);
    }

    private string[] Args(string repo) => ["download", repo, "--local-dir", _dir, "--endpoint", _hub.Endpoint];
}
