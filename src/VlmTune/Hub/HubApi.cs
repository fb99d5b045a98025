using System.Text.Json;

namespace VlmTune.Hub;

/// <summary>The two things a downloader needs from a hub: the file list of a revision, and each file's URL.</summary>
internal abstract class HubApi(HubSettings settings)
{
    protected HubSettings Settings { get; } = settings;

    public static HubApi For(HubSettings settings) => settings.Source == HubSource.HuggingFace
        ? new HuggingFaceApi(settings)
        : new ModelScopeApi(settings);

    public abstract Uri ListingUrl();

    /// <summary>Parses the listing answer into files at one commit.</summary>
    public abstract HubRepoListing ParseListing(JsonElement root);

    /// <summary>URL of one file at <paramref name="commit"/> (the listing's commit, so every file comes from one snapshot).</summary>
    public abstract Uri FileUrl(string commit, string path);

    public async Task<HubRepoListing> ListAsync(HubHttp http, CancellationToken ct)
    {
        using var response = await http.GetAsync(ListingUrl(), HubRequestKind.Listing, "the file list", 0, ct);
        string body;
        using var readTimeout = CancellationTokenSource.CreateLinkedTokenSource(ct);
        readTimeout.CancelAfter(Settings.Options.ReadTimeout);
        try { body = await response.Content.ReadAsStringAsync(readTimeout.Token); }
        catch (Exception e) when (e is HttpRequestException or IOException
                                  || (e is OperationCanceledException && !ct.IsCancellationRequested))
        {
            throw new HubTransientException($"the file list of {Settings.RepoId} was cut off or stalled ({e.Message})", e);
        }
        try
        {
            using var doc = JsonDocument.Parse(body);
            return ParseListing(doc.RootElement);
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or KeyNotFoundException or FormatException)
        {
            throw new HubDownloadException(
                $"The file list of {Settings.RepoId} from {ListingUrl()} is not the expected JSON ({e.Message}); " +
                "is --endpoint (or HF_ENDPOINT) a hub of the kind named by --source?", e);
        }
    }

    protected static string? OptionalString(JsonElement e, string name) =>
        e.ValueKind == JsonValueKind.Object && e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;

    protected static long? OptionalLong(JsonElement e, string name) =>
        e.ValueKind == JsonValueKind.Object && e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetInt64() : null;
}

/// <summary>
/// Hugging Face: <c>GET /api/models/{repo}/revision/{rev}?blobs=true</c> gives the commit (<c>sha</c>) and
/// <c>siblings[]</c> with <c>rfilename</c>, <c>size</c>, <c>blobId</c> and, for LFS files, <c>lfs.sha256</c>;
/// files come from <c>/{repo}/resolve/{commit}/{path}</c>.
/// </summary>
internal sealed class HuggingFaceApi(HubSettings settings) : HubApi(settings)
{
    public override Uri ListingUrl() =>
        new($"{Settings.Endpoint}/api/models/{Settings.RepoId}/revision/{Uri.EscapeDataString(Settings.Revision)}?blobs=true");

    public override Uri FileUrl(string commit, string path) =>
        new($"{Settings.Endpoint}/{Settings.RepoId}/resolve/{Uri.EscapeDataString(commit)}/{HubPaths.EscapePath(path)}");

    public override HubRepoListing ParseListing(JsonElement root)
    {
        var sha = OptionalString(root, "sha");
        var commit = sha is null ? Settings.Revision : HubPaths.ValidateGitId(Settings.RepoId, "the commit", sha);
        if (!root.TryGetProperty("siblings", out var siblings) || siblings.ValueKind != JsonValueKind.Array)
            throw new InvalidOperationException("no 'siblings' array");
        var files = new List<HubFile>();
        foreach (var s in siblings.EnumerateArray())
        {
            var path = HubPaths.ValidateRelative(Settings.RepoId, OptionalString(s, "rfilename")
                ?? throw new InvalidOperationException("a sibling has no 'rfilename'"));
            var lfs = s.TryGetProperty("lfs", out var l) && l.ValueKind == JsonValueKind.Object ? l : default;
            var sha256 = OptionalString(lfs, "sha256")?.ToLowerInvariant();
            if (sha256 is not null && !HubPaths.IsSha256(sha256))
                throw new InvalidOperationException($"'{path}' has an lfs.sha256 that is not 64 hex digits");
            var size = OptionalLong(s, "size") ?? OptionalLong(lfs, "size");
            // The etag of an LFS file is its sha256; of a regular file, its git blob id (it names the partial file: checked).
            var blobId = OptionalString(s, "blobId") is { } id ? HubPaths.ValidateGitId(Settings.RepoId, $"a blobId for '{path}'", id) : null;
            files.Add(new HubFile(path, size, sha256, sha256 ?? blobId));
        }
        return new HubRepoListing(Settings.RepoId, Settings.Revision, commit, files);
    }
}

/// <summary>
/// ModelScope: <c>GET /api/v1/models/{repo}/repo/files?Revision=..&amp;Recursive=True</c> answers
/// <c>{"Code":200,"Success":true,"Data":{"Files":[{"Name","Path","Type":"blob"|"tree","Size","Sha256",...}]}}</c>;
/// files come from <c>/api/v1/models/{repo}/repo?Revision=..&amp;FilePath=..</c>. Like <c>modelscope download</c>,
/// <c>.gitignore</c> and <c>.gitattributes</c> are left out.
/// </summary>
internal sealed class ModelScopeApi(HubSettings settings) : HubApi(settings)
{
    public override Uri ListingUrl() =>
        new($"{Settings.Endpoint}/api/v1/models/{Settings.RepoId}/repo/files?Revision={Uri.EscapeDataString(Settings.Revision)}&Recursive=True");

    public override Uri FileUrl(string commit, string path) =>
        new($"{Settings.Endpoint}/api/v1/models/{Settings.RepoId}/repo?Revision={Uri.EscapeDataString(commit)}&FilePath={Uri.EscapeDataString(path)}");

    public override HubRepoListing ParseListing(JsonElement root)
    {
        // ModelScope reports some errors as HTTP 200 with Success=false and a Code/Message.
        if (root.TryGetProperty("Success", out var ok) && ok.ValueKind == JsonValueKind.False)
        {
            var message = OptionalString(root, "Message") ?? "no message";
            var notFound = message.Contains("not exist", StringComparison.OrdinalIgnoreCase)
                           || message.Contains("not found", StringComparison.OrdinalIgnoreCase);
            throw new HubDownloadException(notFound
                ? $"Not found: repository {Settings.RepoId} or revision '{Settings.Revision}' on {Settings.Endpoint} (server says: {message}). Check the repo id and --revision."
                : $"ModelScope refused the file list of {Settings.RepoId} at revision '{Settings.Revision}' (server says: {message}).");
        }
        var data = root.GetProperty("Data");
        var files = new List<HubFile>();
        if (data.TryGetProperty("Files", out var list) && list.ValueKind == JsonValueKind.Array)
        {
            foreach (var f in list.EnumerateArray())
            {
                if (OptionalString(f, "Type") == "tree") continue;
                var name = OptionalString(f, "Name");
                if (name is ".gitignore" or ".gitattributes") continue;
                var path = HubPaths.ValidateRelative(Settings.RepoId, OptionalString(f, "Path")
                    ?? throw new InvalidOperationException("a file entry has no 'Path'"));
                var sha256 = OptionalString(f, "Sha256")?.ToLowerInvariant();
                if (string.IsNullOrEmpty(sha256)) sha256 = null;
                else if (!HubPaths.IsSha256(sha256))
                    throw new InvalidOperationException($"'{path}' has a Sha256 that is not 64 hex digits");
                files.Add(new HubFile(path, OptionalLong(f, "Size"), sha256, sha256));
            }
        }
        // The listing names no repo-wide commit; the revision itself keys the local metadata.
        return new HubRepoListing(Settings.RepoId, Settings.Revision, Settings.Revision, files);
    }
}
