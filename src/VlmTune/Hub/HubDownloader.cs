using System.Buffers;
using System.Collections.Concurrent;
using System.Net;
using System.Security.Cryptography;

namespace VlmTune.Hub;

/// <summary>
/// Downloads a model repository into a local folder the way <c>huggingface-cli download --local-dir</c> and
/// <c>modelscope download --local_dir</c> do: list the files of a revision, fetch several at once, resume partial files
/// with HTTP Range requests, check sizes and sha256, and move each file under its final name only once verified.
/// Safe against a concurrent download of the same folder (per-file locks) and against being killed (partials resume).
/// </summary>
public static class HubDownloader
{
    private const int BufferSize = 1 << 20;
    private const long ProgressStep = 1 << 20;

    public static Task<HubDownloadResult> DownloadAsync(
        HubDownloadOptions options, IProgress<HubDownloadProgress>? progress = null, CancellationToken ct = default) =>
        DownloadAsync(options, progress, Environment.GetEnvironmentVariable, ct);

    /// <summary>As the public overload, with the environment variables given (tests do not touch the process's).</summary>
    internal static async Task<HubDownloadResult> DownloadAsync(
        HubDownloadOptions options, IProgress<HubDownloadProgress>? progress, Func<string, string?> env, CancellationToken ct)
    {
        var settings = HubSettings.Resolve(options, env);
        var folder = new LocalDownloadFolder(settings.LocalDir);
        if (settings.Offline) return UseLocalCopy(settings, folder, progress);

        using var http = new HubHttp(settings);
        var api = HubApi.For(settings);
        var fullListing = await http.WithRetriesAsync($"Listing the files of {settings.RepoId}", c => api.ListAsync(http, c), null, ct);
        var listing = Select(settings, fullListing);
        Directory.CreateDirectory(settings.LocalDir);
        folder.RemoveStaleTemporaries();
        folder.WriteManifest(settings, fullListing);
        foreach (var f in listing.Files) progress?.Report(new HubDownloadProgress(f.Path, HubFileStatus.Queued, 0, f.Size));

        var results = new HubFileResult[listing.Files.Count];
        var failures = new ConcurrentQueue<(int Index, string Message)>();
        var parallel = new ParallelOptions { MaxDegreeOfParallelism = settings.Options.MaxParallelFiles, CancellationToken = ct };
        await Parallel.ForEachAsync(Enumerable.Range(0, listing.Files.Count), parallel, async (i, c) =>
        {
            var file = listing.Files[i];
            try
            {
                results[i] = await DownloadFileAsync(http, api, folder, listing, file, progress, c);
            }
            catch (Exception e) when (IO.DiskFull.Is(e))
            {
                // Other files would fail the same way: stop them all.
                throw new HubDownloadException(IO.DiskFull.Error(file.Path, settings.LocalDir,
                    "the partial download stays and a rerun resumes it", e).Message, e);
            }
            catch (HubDownloadException e)
            {
                // Other files go on: one clear report of every failed file beats stopping at the first.
                failures.Enqueue((i, e.Message));
                progress?.Report(new HubDownloadProgress(file.Path, HubFileStatus.Failed, 0, file.Size, Message: e.Message));
            }
        });
        if (!failures.IsEmpty)
        {
            var messages = failures.OrderBy(f => f.Index).Select(f => f.Message).Distinct().ToList();
            throw new HubDownloadException(messages.Count == 1
                ? messages[0]
                : $"{failures.Count} of {listing.Files.Count} files of {settings.RepoId} failed:\n  " + string.Join("\n  ", messages));
        }
        return new HubDownloadResult(listing.RepoId, listing.Revision, listing.Commit, settings.LocalDir, results);
    }

    /// <summary>Offline mode: every file of the last listing must be complete here; else name the ones that are not.</summary>
    private static HubDownloadResult UseLocalCopy(HubSettings settings, LocalDownloadFolder folder, IProgress<HubDownloadProgress>? progress)
    {
        var saved = folder.ReadManifest() ?? throw new HubDownloadException(
            $"Offline mode (HF_HUB_OFFLINE): {settings.LocalDir} holds no completed listing of {settings.RepoId} " +
            $"({folder.ManifestPath} is missing). Download it once with network access (unset HF_HUB_OFFLINE).");
        var (source, listing) = saved;
        if (source != settings.Source || !string.Equals(listing.RepoId, settings.RepoId, StringComparison.OrdinalIgnoreCase))
            throw new HubDownloadException(
                $"Offline mode (HF_HUB_OFFLINE): {settings.LocalDir} holds {listing.RepoId} from {source.Name()}, " +
                $"not {settings.RepoId} from {settings.Source.Name()}.");
        if (settings.RevisionGiven && settings.Revision != listing.Revision && settings.Revision != listing.Commit)
            throw new HubDownloadException(
                $"Offline mode (HF_HUB_OFFLINE): {settings.LocalDir} holds {listing.RepoId} at revision '{listing.Revision}' " +
                $"(commit {listing.Commit}), not '{settings.Revision}'.");
        listing = Select(settings, listing);

        var results = new List<HubFileResult>();
        var missing = new List<string>();
        foreach (var file in listing.Files)
        {
            var paths = folder.PathsFor(file);
            if (!LocalDownloadFolder.IsComplete(file, listing.Commit, paths)) { missing.Add(file.Path); continue; }
            var size = new FileInfo(paths.Final).Length;
            results.Add(new HubFileResult(file.Path, paths.Final, size, HubFileOutcome.UpToDate));
            progress?.Report(new HubDownloadProgress(file.Path, HubFileStatus.UpToDate, size, size));
        }
        if (missing.Count > 0)
            throw new HubDownloadException(
                $"Offline mode (HF_HUB_OFFLINE): {missing.Count} of {listing.Files.Count} files of {listing.RepoId} are missing " +
                $"or incomplete in {settings.LocalDir}: {string.Join(", ", missing)}. Unset HF_HUB_OFFLINE to download them.");
        return new HubDownloadResult(listing.RepoId, listing.Revision, listing.Commit, settings.LocalDir, results);
    }

    /// <summary>The listing narrowed to <c>--include</c>/<c>--exclude</c>; matching nothing is an error, not a silent no-op.</summary>
    private static HubRepoListing Select(HubSettings settings, HubRepoListing listing)
    {
        var filter = new HubFileFilter(settings.Options.Include, settings.Options.Exclude);
        if (filter.IsEmpty) return listing;
        var kept = listing.Files.Where(f => filter.Keeps(f.Path)).ToList();
        if (kept.Count == 0)
            throw new HubDownloadException(
                $"None of the {listing.Files.Count} files of {listing.RepoId} matches --include [{string.Join(' ', settings.Options.Include ?? [])}] " +
                $"--exclude [{string.Join(' ', settings.Options.Exclude ?? [])}]; files are: {string.Join(", ", listing.Files.Take(20).Select(f => f.Path))}.");
        return listing with { Files = kept };
    }

    private static async Task<HubFileResult> DownloadFileAsync(
        HubHttp http, HubApi api, LocalDownloadFolder folder, HubRepoListing listing, HubFile file,
        IProgress<HubDownloadProgress>? progress, CancellationToken ct)
    {
        var paths = folder.PathsFor(file);
        if (LocalDownloadFolder.IsComplete(file, listing.Commit, paths)) return UpToDate();

        using var fileLock = await FileLock.AcquireAsync(paths.Lock, http.Settings.Options.LockTimeout,
            () => progress?.Report(new HubDownloadProgress(file.Path, HubFileStatus.WaitingForLock, 0, file.Size)), ct);
        // Whoever held the lock may just have finished this very file.
        if (LocalDownloadFolder.IsComplete(file, listing.Commit, paths)) return UpToDate();
        if (await MatchesBySha256Async(file, paths.Final, ct))
        {
            // Present but without our metadata (copied in, or killed between rename and metadata): the hash proves it.
            LocalDownloadFolder.WriteMetadata(paths, listing.Commit, file.Etag, file.Size!.Value);
            return UpToDate();
        }

        LocalDownloadFolder.DeleteStalePartials(paths);
        var transfer = new Transfer(http, file, paths.Partial, api.FileUrl(listing.Commit, file.Path), progress);
        await http.WithRetriesAsync($"Downloading {file.Path}", transfer.RunAsync, (attempt, delay, why) =>
            progress?.Report(new HubDownloadProgress(file.Path, HubFileStatus.Retrying, transfer.BytesDone, transfer.ExpectedSize,
                Message: $"{why}; retry {attempt} in {delay.TotalSeconds:0.#} s")), ct);
        var size = transfer.Verify();

        Directory.CreateDirectory(Path.GetDirectoryName(paths.Final)!);
        File.Move(paths.Partial, paths.Final, overwrite: true); // atomic: the final name only ever holds a verified file
        LocalDownloadFolder.WriteMetadata(paths, listing.Commit, file.Etag, size);
        progress?.Report(new HubDownloadProgress(file.Path, HubFileStatus.Done, size, size, transfer.FirstResumedFrom));
        return new HubFileResult(file.Path, paths.Final, size, HubFileOutcome.Downloaded);

        HubFileResult UpToDate()
        {
            var size = new FileInfo(paths.Final).Length;
            progress?.Report(new HubDownloadProgress(file.Path, HubFileStatus.UpToDate, size, size));
            return new HubFileResult(file.Path, paths.Final, size, HubFileOutcome.UpToDate);
        }
    }

    private static async Task<bool> MatchesBySha256Async(HubFile file, string path, CancellationToken ct)
    {
        var info = new FileInfo(path);
        if (file.Sha256 is null || file.Size is null || !info.Exists || info.Length != file.Size) return false;
        await using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, BufferSize, useAsync: true);
        return Convert.ToHexStringLower(await SHA256.HashDataAsync(stream, ct)) == file.Sha256;
    }

    /// <summary>
    /// The transfer of one file into its partial file, one attempt per <see cref="RunAsync"/>: each attempt resumes from
    /// the partial's length with a Range request. The sha256 is computed as bytes arrive (and over the partial's
    /// earlier bytes when a previous process left them), so verification needs no second pass.
    /// </summary>
    private sealed class Transfer(HubHttp http, HubFile file, string partial, Uri url, IProgress<HubDownloadProgress>? progress)
    {
        private IncrementalHash? _hash;
        private long _hashedBytes;

        public long BytesDone { get; private set; }
        public long? ExpectedSize { get; private set; } = file.Size;
        public string? ExpectedSha256 { get; private set; } = file.Sha256;
        public long FirstResumedFrom { get; private set; } = -1;

        public async Task<bool> RunAsync(CancellationToken ct)
        {
            Directory.CreateDirectory(Path.GetDirectoryName(partial)!);
            var offset = File.Exists(partial) ? new FileInfo(partial).Length : 0;
            if (ExpectedSize is { } expected && offset > expected) { File.Delete(partial); offset = 0; }
            if (FirstResumedFrom < 0) FirstResumedFrom = offset;
            if (ExpectedSize is { } size && offset == size && offset > 0)
            {
                await CatchUpHashAsync(offset, ct); // complete already (killed before the rename): just verify
                BytesDone = offset;
                return true;
            }

            var (response, headers) = await http.GetWithHeadersAsync(url, HubRequestKind.File, file.Path, offset, ct);
            using var _ = response;
            // A listing without sha256 or size (some mirrors) is completed from the hub's X-Linked-* headers.
            ExpectedSha256 ??= headers.Sha256;
            ExpectedSize ??= headers.Size;
            if (response.StatusCode == HttpStatusCode.RequestedRangeNotSatisfiable)
            {
                // The partial does not fit the file the server has: start over.
                File.Delete(partial);
                throw new HubTransientException($"the server rejected resuming {file.Path} at byte {offset} (HTTP 416)");
            }
            if (response.StatusCode == HttpStatusCode.PartialContent)
            {
                var range = response.Content.Headers.ContentRange;
                if (range?.From != offset)
                    throw new HubTransientException($"asked for {file.Path} from byte {offset}, the server sent a range starting at {range?.From}");
                ExpectedSize ??= range.Length;
            }
            else
            {
                offset = 0; // the server ignored the Range header: the body is the whole file
                ExpectedSize ??= response.Content.Headers.ContentLength;
            }
            await CatchUpHashAsync(offset, ct);

            await using var output = new FileStream(partial, offset == 0 ? FileMode.Create : FileMode.Append, FileAccess.Write,
                FileShare.Read, bufferSize: 0); // unbuffered: what a kill -9 leaves on disk is exactly what was received
            BytesDone = offset;
            progress?.Report(new HubDownloadProgress(file.Path, HubFileStatus.Downloading, BytesDone, ExpectedSize, offset));

            var buffer = ArrayPool<byte>.Shared.Rent(BufferSize);
            try
            {
                await using var body = await response.Content.ReadAsStreamAsync(ct);
                using var readTimeout = CancellationTokenSource.CreateLinkedTokenSource(ct);
                var lastReported = BytesDone;
                while (true)
                {
                    int n;
                    readTimeout.CancelAfter(http.Settings.Options.ReadTimeout);
                    try
                    {
                        n = await body.ReadAsync(buffer.AsMemory(0, BufferSize), readTimeout.Token);
                    }
                    catch (OperationCanceledException e) when (!ct.IsCancellationRequested)
                    {
                        throw new HubTransientException(
                            $"no data for {http.Settings.Options.ReadTimeout.TotalSeconds:0} s while downloading {file.Path} (at byte {BytesDone})", e);
                    }
                    catch (Exception e) when (e is IOException or HttpRequestException)
                    {
                        throw new HubTransientException($"the connection broke while downloading {file.Path} at byte {BytesDone} ({e.Message})", e);
                    }
                    if (n == 0) break;
                    await output.WriteAsync(buffer.AsMemory(0, n), ct);
                    _hash?.AppendData(buffer, 0, n);
                    _hashedBytes += n;
                    BytesDone += n;
                    if (BytesDone - lastReported >= ProgressStep)
                    {
                        lastReported = BytesDone;
                        progress?.Report(new HubDownloadProgress(file.Path, HubFileStatus.Downloading, BytesDone, ExpectedSize, offset));
                    }
                }
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(buffer);
            }
            if (ExpectedSize is { } total && BytesDone < total)
                throw new HubTransientException($"the connection closed after {BytesDone} of {total} bytes of {file.Path}");
            return true;
        }

        /// <summary>Brings the running sha256 to cover exactly the partial's first <paramref name="offset"/> bytes.</summary>
        private async Task CatchUpHashAsync(long offset, CancellationToken ct)
        {
            if (ExpectedSha256 is null) return;
            if (_hash is not null && _hashedBytes == offset) return;
            _hash?.Dispose();
            _hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
            _hashedBytes = 0;
            if (offset == 0) return;
            await using var input = new FileStream(partial, FileMode.Open, FileAccess.Read, FileShare.ReadWrite, BufferSize, useAsync: true);
            var buffer = ArrayPool<byte>.Shared.Rent(BufferSize);
            try
            {
                while (_hashedBytes < offset)
                {
                    var n = await input.ReadAsync(buffer.AsMemory(0, (int)Math.Min(BufferSize, offset - _hashedBytes)), ct);
                    if (n == 0) throw new IOException($"{partial} shrank while being read");
                    _hash.AppendData(buffer, 0, n);
                    _hashedBytes += n;
                }
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(buffer);
            }
        }

        /// <summary>Checks size and sha256 of the finished partial; on a mismatch deletes it and says which file.</summary>
        public long Verify()
        {
            var size = new FileInfo(partial).Length;
            string? problem = null;
            if (ExpectedSize is { } expected && size != expected)
                problem = $"got {size} bytes, the hub lists {expected}";
            else if (ExpectedSha256 is not null && _hash is not null)
            {
                var actual = Convert.ToHexStringLower(_hash.GetHashAndReset());
                if (actual != ExpectedSha256) problem = $"sha256 is {actual}, the hub says {ExpectedSha256}";
            }
            if (problem is null) return size;
            File.Delete(partial);
            throw new HubDownloadException(
                $"{file.Path} is corrupt ({problem}); the partial download was deleted. Rerun to download it again; " +
                "if this repeats, the hub or mirror serves a damaged file.");
        }
    }
}
