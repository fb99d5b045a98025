namespace VlmTune.Hub;

/// <summary>
/// What <see cref="HubDownloader"/> fetches and how. Null fields take the same defaults (and environment variables) as
/// <c>huggingface-cli download</c> / <c>modelscope download</c>; see docs/download.md.
/// </summary>
public sealed record HubDownloadOptions
{
    /// <summary>Repository id, <c>owner/name</c>.</summary>
    public required string RepoId { get; init; }

    /// <summary>Folder that receives the files (created if missing); bookkeeping goes to <c>LocalDir/.cache/vlmtune/download</c>.</summary>
    public required string LocalDir { get; init; }

    public HubSource Source { get; init; } = HubSource.HuggingFace;

    /// <summary>Branch, tag or commit; null means <c>main</c> (Hugging Face) or <c>master</c> (ModelScope).</summary>
    public string? Revision { get; init; }

    /// <summary>Access token sent as <c>Authorization: Bearer</c>; null reads HF_TOKEN (or MODELSCOPE_API_TOKEN).</summary>
    public string? Token { get; init; }

    /// <summary>Hub base URL; null reads HF_ENDPOINT (or MODELSCOPE_DOMAIN), else the public hub.</summary>
    public string? Endpoint { get; init; }

    /// <summary>Use only what is already in <see cref="LocalDir"/>; null reads HF_HUB_OFFLINE.</summary>
    public bool? Offline { get; init; }

    /// <summary>Glob patterns of repo paths to download (all when empty), like <c>--include "*.json" "*.safetensors"</c>.</summary>
    public IReadOnlyList<string>? Include { get; init; }

    /// <summary>Glob patterns of repo paths to leave out.</summary>
    public IReadOnlyList<string>? Exclude { get; init; }

    /// <summary>Files downloaded at the same time.</summary>
    public int MaxParallelFiles { get; init; } = 8;

    /// <summary>Retries of one request after a network failure, 429 or 5xx, with exponential backoff.</summary>
    public int MaxRetries { get; init; } = 5;

    /// <summary>First backoff delay; doubles on each retry up to <see cref="MaxRetryDelay"/>.</summary>
    public TimeSpan RetryDelay { get; init; } = TimeSpan.FromSeconds(1);

    public TimeSpan MaxRetryDelay { get; init; } = TimeSpan.FromSeconds(8);

    /// <summary>A read that receives nothing for this long counts as a network failure (and is retried).</summary>
    public TimeSpan ReadTimeout { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>How long to wait for another process that is downloading the same file before giving up.</summary>
    public TimeSpan LockTimeout { get; init; } = TimeSpan.FromMinutes(30);
}
