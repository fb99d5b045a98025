namespace VlmTune.Hub;

/// <summary>Where one file stands; reported through <see cref="IProgress{T}"/> by <see cref="HubDownloader"/>.</summary>
public enum HubFileStatus
{
    /// <summary>Listed and waiting for a free download slot (reported for every file right after the listing).</summary>
    Queued,

    /// <summary>Another process holds the file's lock (it is downloading the same file); waiting for it.</summary>
    WaitingForLock,

    /// <summary>Bytes are arriving; <see cref="HubDownloadProgress.BytesDone"/> counts the partial file, resumed bytes included.</summary>
    Downloading,

    /// <summary>A transfer failed and will be retried after a backoff; the message says why.</summary>
    Retrying,

    /// <summary>Downloaded, verified and moved under its final name.</summary>
    Done,

    /// <summary>Already present with matching metadata; nothing downloaded.</summary>
    UpToDate,

    /// <summary>Gave up on this file; the message says why (the whole download then fails).</summary>
    Failed,
}

/// <summary>
/// One progress event. <paramref name="ResumedFrom"/> is the size of the partial file a transfer resumed from (0 for
/// a fresh start). Events of different files arrive from different threads.
/// </summary>
public sealed record HubDownloadProgress(
    string Path, HubFileStatus Status, long BytesDone, long? TotalBytes, long ResumedFrom = 0, string? Message = null);

/// <summary>How one file ended.</summary>
public enum HubFileOutcome { Downloaded, UpToDate }

public sealed record HubFileResult(string Path, string LocalPath, long Size, HubFileOutcome Outcome);

/// <summary>What <see cref="HubDownloader.DownloadAsync(HubDownloadOptions, IProgress{HubDownloadProgress}?, CancellationToken)"/> did: every file of the repo is under <see cref="LocalDir"/>.</summary>
public sealed record HubDownloadResult(
    string RepoId, string Revision, string Commit, string LocalDir, IReadOnlyList<HubFileResult> Files)
{
    public int DownloadedCount => Files.Count(f => f.Outcome == HubFileOutcome.Downloaded);
    public long TotalBytes => Files.Sum(f => f.Size);
}
