using System.Collections.Concurrent;
using VlmTune.Hub;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Hub;

/// <summary>The downloader against <see cref="FakeHub"/>: complete copies, resume, verification, auth, offline, locks.</summary>
public sealed class HubDownloaderTests : IAsyncLifetime
{
    private const string Weights = "model.safetensors";
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "vlmtune-download-" + Guid.NewGuid().ToString("N"));
    private FakeHub _hub = null!;

    public async Task InitializeAsync() => _hub = await FakeHub.StartAsync();

    public async Task DisposeAsync()
    {
        await _hub.DisposeAsync();
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    [FixtureFact]
    public async Task DownloadsEveryFileByteForByteThenFindsThemUpToDate()
    {
        var progress = new Recorder();
        var result = await Download(Options(), progress: progress);

        AssertIntactCopy(_hub.Files);
        Assert.Equal(FakeHub.Commit, result.Commit);
        Assert.Equal(_hub.Files.Count, result.DownloadedCount);
        Assert.Contains(_hub.Requests, r => r.Kind == "hf-list" && r.Url.EndsWith("/revision/main?blobs=true"));
        // Files come from the listed commit, so a branch moving mid-download cannot mix versions.
        Assert.All(_hub.Requests.Where(r => r.Kind == "resolve"), r => Assert.Contains($"/resolve/{FakeHub.Commit}/", r.Url));
        Assert.Contains(_hub.Requests, r => r.Url.Contains("/examples/hello%20world.txt"));
        Assert.Contains(progress.Events, e => e.Path == Weights && e.Status == HubFileStatus.Done && e.BytesDone == _hub.File(Weights).Bytes.Length);

        _hub.Requests.Clear();
        var again = await Download(Options());
        Assert.Equal(0, again.DownloadedCount);
        Assert.All(again.Files, f => Assert.Equal(HubFileOutcome.UpToDate, f.Outcome));
        Assert.Equal(["hf-list"], _hub.Requests.Select(r => r.Kind));
    }

    [FixtureFact]
    public async Task StalledTransferTimesOutAndResumesWithARangeRequest()
    {
        const long stallAt = 5_000_000;
        _hub.StallOnce(Weights, stallAt); // never released: only the client's read timeout gets it going again
        var progress = new Recorder();
        await Download(Options() with { ReadTimeout = TimeSpan.FromMilliseconds(1500) }, progress: progress);

        AssertIntactCopy(_hub.Files);
        var ranges = _hub.Transfers(Weights).Where(r => r.Kind == "cdn").Select(r => r.Range).ToList();
        Assert.True(ranges.Count >= 2 && ranges[0] is null && ranges[1] == $"bytes={stallAt}-", $"ranges: {string.Join(", ", ranges)}");
        // A loaded machine can also leave a healthy transfer quiet past the timeout: any further attempt resumes
        // where the previous one stopped, later in the file each time.
        var offsets = ranges.Skip(1).Select(r => long.Parse(r!["bytes=".Length..^1])).ToList();
        Assert.True(offsets.Zip(offsets.Skip(1)).All(p => p.First < p.Second), $"ranges: {string.Join(", ", ranges)}");
        var retries = progress.Events.Where(e => e.Path == Weights && e.Status == HubFileStatus.Retrying).ToList();
        Assert.Equal(ranges.Count - 1, retries.Count);
        Assert.All(retries, r => Assert.Contains("no data for", r.Message));
    }

    [FixtureFact]
    public async Task NextRunResumesThePartialFileOfABrokenConnection()
    {
        _hub.CutOnce(Weights, 20_000_000);
        var error = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options() with { MaxRetries = 0 }));
        Assert.Contains(Weights, error.Message);
        Assert.Contains("connection", error.Message);
        Assert.Contains("rerunning resumes", error.Message);
        Assert.False(File.Exists(Path.Combine(_dir, Weights)), "a partial file must never sit under the final name");
        // What reached the client before the connection dropped (in-flight bytes are lost with it).
        var kept = new FileInfo(Assert.Single(Partials())).Length;
        Assert.InRange(kept, 1, 20_000_000);

        await Download(Options());
        AssertIntactCopy(_hub.Files);
        Assert.Equal($"bytes={kept}-", _hub.Transfers(Weights).Last(r => r.Kind == "cdn").Range);
    }

    [FixtureFact]
    public async Task CorruptedFileIsDetectedAndNeverKept()
    {
        _hub.Corrupt[Weights] = true;
        var error = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options()));
        Assert.Contains(Weights, error.Message);
        Assert.Contains("sha256", error.Message);
        Assert.Contains(_hub.File(Weights).Sha256, error.Message);
        Assert.False(File.Exists(Path.Combine(_dir, Weights)));
        Assert.Empty(Partials());
        // The other files are complete and verified: one bad file does not cost the rest.
        Assert.Equal(_hub.File("config.json").Bytes, File.ReadAllBytes(Path.Combine(_dir, "config.json")));

        _hub.Corrupt.Clear();
        var retry = await Download(Options());
        Assert.Equal(1, retry.DownloadedCount);
        AssertIntactCopy(_hub.Files);
    }

    [FixtureFact]
    public async Task PrivateRepoNeedsTheTokenFromTheFlagOrHfToken()
    {
        _hub.RequiredToken = "hf_secret";
        _hub.CdnHost = "localhost"; // storage on another origin than the endpoint (127.0.0.1)
        var error = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options()));
        Assert.Contains("401", error.Message);
        Assert.Contains("HF_TOKEN", error.Message);

        var wrong = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options() with { Token = "hf_wrong" }));
        Assert.Contains("token was refused", wrong.Message);

        await Download(Options(), env: new() { ["HF_TOKEN"] = "hf_secret" });
        AssertIntactCopy(_hub.Files);
        Assert.All(_hub.Requests.Where(r => r.Kind == "resolve"), r => Assert.Equal("Bearer hf_secret", r.Authorization));
        // The token never leaves the hub's origin: redirects to storage go without it.
        Assert.All(_hub.Requests.Where(r => r.Kind == "cdn"), r => Assert.Null(r.Authorization));
        Assert.Equal(2, _hub.Requests.Count(r => r.Kind == "cdn"));
    }

    [FixtureFact]
    public async Task MissingRepoRevisionOrFileIsReportedAsNotFound()
    {
        var repo = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options() with { RepoId = "test-org/nope" }));
        Assert.Contains("repository test-org/nope not found", repo.Message);
        var revision = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options() with { Revision = "v9" }));
        Assert.Contains("revision 'v9' not found", revision.Message);
        Assert.False(Directory.Exists(Path.Combine(_dir, ".cache")), "nothing is written when the listing fails");
    }

    [FixtureFact]
    public async Task TransientServerErrorsAreRetriedWithBackoff()
    {
        _hub.FailNext(3);
        await Download(Options());
        AssertIntactCopy(_hub.Files);
        Assert.Equal(3, _hub.Requests.Count(r => r.Kind == "503"));

        _hub.FailNext(100);
        var error = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options() with { LocalDir = _dir + "-2", MaxRetries = 2 }));
        Assert.Contains("after 3 attempt(s)", error.Message);
        Assert.Contains("503", error.Message);
    }

    [FixtureFact]
    public async Task OfflineModeUsesCompleteFilesOrNamesTheMissingOnes()
    {
        var offline = new Dictionary<string, string> { ["HF_HUB_OFFLINE"] = "1" };
        var none = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options() with { Offline = null }, offline));
        Assert.Contains("no completed listing", none.Message);

        await Download(Options());
        _hub.Requests.Clear();
        var result = await Download(Options() with { Offline = null, Endpoint = "http://127.0.0.1:9" }, offline);
        Assert.Equal(_hub.Files.Count, result.Files.Count);
        Assert.Empty(_hub.Requests);

        File.Delete(Path.Combine(_dir, "tokenizer.model"));
        File.AppendAllText(Path.Combine(_dir, "config.json"), " "); // edited after download: no longer the hub's file
        var missing = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options() with { Offline = null }, offline));
        Assert.Contains("2 of 9 files", missing.Message);
        Assert.Contains("tokenizer.model", missing.Message);
        Assert.Contains("config.json", missing.Message);
        Assert.DoesNotContain(Weights, missing.Message);
        Assert.Empty(_hub.Requests);
    }

    [FixtureFact]
    public async Task TwoConcurrentDownloadsOfOneRepoEndWithOneIntactCopy()
    {
        var stall = _hub.StallOnce(Weights, 3_000_000);
        var progress = new Recorder();
        var first = Download(Options(), progress: progress);
        var second = Download(Options(), progress: progress);
        await stall.Reached.Task.WaitAsync(TimeSpan.FromSeconds(30));
        // Whichever download got the weights' lock is stalled; the other must be waiting on that lock.
        await progress.WaitForAsync(e => e.Path == Weights && e.Status == HubFileStatus.WaitingForLock);
        stall.Release.SetResult();
        var results = await Task.WhenAll(first, second);

        AssertIntactCopy(_hub.Files);
        foreach (var file in _hub.Files)
            Assert.Single(_hub.Requests, r => r.Kind == "resolve" && r.File == file.Path);
        Assert.Equal(_hub.Files.Count, results.Sum(r => r.DownloadedCount));
    }

    [FixtureFact]
    public async Task ModelScopeLayoutDownloadsAndVerifiesEveryFile()
    {
        var options = Options(HubSource.ModelScope);
        _hub.Corrupt["config.json"] = true; // ModelScope lists a sha256 for every file, not only LFS ones
        var error = await Assert.ThrowsAsync<HubDownloadException>(() => Download(options));
        Assert.Contains("config.json is corrupt", error.Message);
        _hub.Corrupt.Clear();

        var result = await Download(options);
        var expected = _hub.Files.Where(f => f.Path != ".gitattributes").ToList(); // modelscope download skips it
        AssertIntactCopy(expected);
        Assert.False(File.Exists(Path.Combine(_dir, ".gitattributes")));
        Assert.Equal(expected.Count, result.Files.Count);
        Assert.Contains(_hub.Requests, r => r.Kind == "ms-list" && r.Url.Contains("Revision=master&Recursive=True"));
        Assert.Contains(_hub.Requests, r => r.Kind == "ms-file" && r.File == "examples/hello world.txt");

        var missing = await Assert.ThrowsAsync<HubDownloadException>(() => Download(options with { RepoId = "test-org/nope" }));
        Assert.Contains("not exists", missing.Message);
    }

    [FixtureFact]
    public async Task ListingWithNamesOnlyTakesSizesFromTheTransfer()
    {
        _hub.ListsNamesOnly = true;
        _hub.CutOnce(Weights, 9_000_000);
        await Download(Options());
        AssertIntactCopy(_hub.Files);
        // Without a listed size the Content-Length tells when a body was cut short, and the resume still works.
        Assert.Equal(2, _hub.Transfers(Weights).Count(r => r.Kind == "cdn"));

        _hub.Requests.Clear();
        var again = await Download(Options());
        Assert.Equal(0, again.DownloadedCount);
        Assert.Equal(["hf-list"], _hub.Requests.Select(r => r.Kind));
    }

    [FixtureFact]
    public async Task ListingWithNamesOnlyStillVerifiesLfsFilesByTheirLinkedEtag()
    {
        _hub.ListsNamesOnly = true;
        _hub.Corrupt[Weights] = true;
        var error = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options()));
        Assert.Contains($"{Weights} is corrupt", error.Message);
        Assert.Contains(_hub.File(Weights).Sha256, error.Message); // from X-Linked-Etag of the resolve answer
        Assert.False(File.Exists(Path.Combine(_dir, Weights)));
        Assert.Empty(Partials());
    }

    [FixtureFact]
    public async Task PartialOfAnOlderVersionIsDiscardedNotResumed()
    {
        var book = Path.Combine(_dir, ".cache", "vlmtune", "download");
        Directory.CreateDirectory(book);
        var stale = Path.Combine(book, $"{Weights}.{new string('a', 64)}.incomplete");
        File.WriteAllBytes(stale, new byte[1000]);

        await Download(Options());
        AssertIntactCopy(_hub.Files);
        Assert.False(File.Exists(stale));
        Assert.All(_hub.Transfers(Weights), r => Assert.Null(r.Range));
    }

    [FixtureFact]
    public async Task PathsThatWouldEscapeTheFolderAreRefused()
    {
        _hub.ExtraListedPath = "../outside.txt";
        var error = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options()));
        Assert.Contains("'../outside.txt'", error.Message);
        Assert.False(File.Exists(Path.Combine(_dir, "..", "outside.txt")));
    }

    [FixtureFact]
    public async Task BlobIdsAndCommitsThatAreNotGitIdsAreRefusedBeforeAnythingIsWritten()
    {
        // The blob id names the partial file: "/../" in it put hub-chosen bytes outside --local-dir.
        string escape = "vlmtune-escaped-" + Guid.NewGuid().ToString("N");
        _hub.ListedBlobIds["config.json"] = $"/../../../../../{escape}";
        var error = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options()));
        Assert.Contains("blobId", error.Message);
        Assert.Contains("'config.json'", error.Message);
        Assert.Contains("not a git object id", error.Message);
        Assert.Empty(_hub.Transfers("config.json"));
        Assert.Empty(Directory.EnumerateFiles(Path.GetTempPath(), escape + "*"));
        Assert.False(Directory.Exists(_dir));

        _hub.ListedBlobIds.Clear();
        _hub.ListedCommit = "main\nbad";
        var commit = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options()));
        Assert.Contains("the commit 'main\\u000abad'", commit.Message);   // shown on one line
        Assert.DoesNotContain('\n', commit.Message);
    }

    [FixtureFact]
    public async Task TheHubsLinkedEtagWinsOverThePlainEtagOfSameOriginStorage()
    {
        // No sha256 in the listing: the hub's X-Linked-Etag is the only word on the content. Storage on the hub's own
        // origin answers with a plain ETag of the bytes it serves, which must not override it.
        _hub.ListsNamesOnly = true;
        string claimed = new string('a', 64);
        _hub.LinkedEtags[Weights] = claimed;
        var error = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options()));
        Assert.Contains($"{Weights} is corrupt (sha256 is {_hub.File(Weights).Sha256}, the hub says {claimed})", error.Message);
        Assert.False(File.Exists(Path.Combine(_dir, Weights)));
        Assert.Empty(Partials());
    }

    [FixtureFact]
    public async Task TemporariesOfKilledDownloadsAreRemovedAndPartialsKept()
    {
        var book = Path.Combine(_dir, ".cache", "vlmtune", "download");
        Directory.CreateDirectory(Path.Combine(book, "examples"));
        string dead = Path.Combine(book, "examples", Temporaries.OfDeadProcess("hello world.txt.metadata.tmp-"));
        string live = Path.Combine(book, Temporaries.OfLiveProcess(".manifest.json.tmp-"));
        File.WriteAllText(dead, "half");
        File.WriteAllText(live, "half");
        _hub.CutOnce(Weights, 3_000_000);
        await Assert.ThrowsAnyAsync<Exception>(() => Download(Options() with { MaxRetries = 0 }));
        long resumable = new FileInfo(Assert.Single(Partials())).Length;

        await Download(Options());
        Assert.False(File.Exists(dead));
        Assert.True(File.Exists(live));
        Assert.Equal($"bytes={resumable}-", _hub.Transfers(Weights).Last(r => r.Kind == "cdn").Range);   // the partial was kept
        AssertIntactCopy(_hub.Files);
    }

    [FixtureFact]
    public async Task ADamagedManifestIsNamedInOfflineMode()
    {
        await Download(Options());
        string manifest = Path.Combine(_dir, ".cache", "vlmtune", "download", ".manifest.json");
        string good = File.ReadAllText(manifest);
        // Fields missing or null: was "Value cannot be null. (Parameter 'source')".
        foreach (var (damage, why) in new[] { ("\"files\": [", "\"files\": null, \"x\": ["), ("\"source\": \"hf\"", "\"source\": \"zz\"") })
        {
            File.WriteAllText(manifest, good.Replace(damage, why));
            var error = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options() with { Offline = true }));
            Assert.StartsWith($"{manifest} is damaged (", error.Message);
            Assert.Contains("rerun without HF_HUB_OFFLINE", error.Message);
        }
    }

    [FixtureFact]
    public async Task IncludeAndExcludePatternsPickTheFiles()
    {
        var options = Options() with { Include = ["*.json", "examples/"], Exclude = ["tokenizer*"] };
        var result = await Download(options);
        string[] expected = ["added_tokens.json", "config.json", "examples/hello world.txt", "generation_config.json", "special_tokens_map.json"];
        Assert.Equal(expected, result.Files.Select(f => f.Path).Order(StringComparer.Ordinal));
        AssertIntactCopy(_hub.Files.Where(f => expected.Contains(f.Path)));
        Assert.False(File.Exists(Path.Combine(_dir, Weights)));

        // Offline, the same selection is complete; the whole repo is not.
        await Download(options with { Offline = true });
        var whole = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options() with { Offline = true }));
        Assert.Contains("4 of 9 files", whole.Message);

        var none = await Assert.ThrowsAsync<HubDownloadException>(() => Download(Options() with { Include = ["*.bin"] }));
        Assert.Contains("None of the 9 files", none.Message);
    }

    private HubDownloadOptions Options(HubSource source = HubSource.HuggingFace) => new()
    {
        RepoId = FakeHub.RepoId,
        LocalDir = _dir,
        Source = source,
        Endpoint = _hub.Endpoint,
        Offline = false,
        RetryDelay = TimeSpan.FromMilliseconds(10),
        MaxRetryDelay = TimeSpan.FromMilliseconds(40),
    };

    private static Task<HubDownloadResult> Download(
        HubDownloadOptions options, Dictionary<string, string>? env = null, IProgress<HubDownloadProgress>? progress = null) =>
        HubDownloader.DownloadAsync(options, progress, name => env?.GetValueOrDefault(name), CancellationToken.None);

    private IEnumerable<string> Partials() =>
        Directory.Exists(_dir) ? Directory.EnumerateFiles(_dir, "*.incomplete", SearchOption.AllDirectories) : [];

    private void AssertIntactCopy(IEnumerable<FakeHub.RepoFile> files)
    {
        foreach (var file in files)
        {
            var local = Path.Combine(_dir, file.Path);
            Assert.True(File.Exists(local), $"{file.Path} is missing");
            Assert.True(file.Bytes.AsSpan().SequenceEqual(File.ReadAllBytes(local)), $"{file.Path} differs from the hub's");
        }
        Assert.Empty(Partials());
    }

    /// <summary>Collects progress events synchronously (Progress&lt;T&gt; would post them later, out of order).</summary>
    private sealed class Recorder : IProgress<HubDownloadProgress>
    {
        public ConcurrentQueue<HubDownloadProgress> Events { get; } = new();

        public void Report(HubDownloadProgress value) => Events.Enqueue(value);

        public async Task WaitForAsync(Func<HubDownloadProgress, bool> match)
        {
            for (var i = 0; i < 1500 && !Events.Any(match); i++) await Task.Delay(20);
            Assert.Contains(Events, e => match(e));
        }
    }
}
