using System.Text.RegularExpressions;

namespace VlmTune.Hub;

/// <summary>
/// One file of a repository as the hub lists it. <see cref="Sha256"/> is known for LFS files on Hugging Face and for
/// every file on ModelScope; <see cref="Etag"/> identifies the content (the sha256, else the git blob id) so that a
/// local copy or a partial download can be matched to the remote version.
/// </summary>
public sealed record HubFile(string Path, long? Size, string? Sha256, string? Etag);

/// <summary>A repository at one commit: what <see cref="HubDownloader"/> downloads.</summary>
public sealed record HubRepoListing(string RepoId, string Revision, string Commit, IReadOnlyList<HubFile> Files);

internal static partial class HubPaths
{
    [GeneratedRegex("^[0-9a-f]{64}$")]
    private static partial Regex Sha256Regex();

    // A git object id: sha1 (40 hex digits) or, in sha256 repositories, 64.
    [GeneratedRegex("^(?:[0-9a-f]{40}|[0-9a-f]{64})$")]
    private static partial Regex GitIdRegex();

    public static bool IsSha256(string? value) => value is not null && Sha256Regex().IsMatch(value);

    public static bool IsGitId(string? value) => value is not null && GitIdRegex().IsMatch(value);

    /// <summary>
    /// Rejects a git object id from a listing (a blob id that names partial files, the commit that goes into metadata)
    /// that is anything else: such a name could carry <c>/../</c> into a path or a newline into a file.
    /// </summary>
    public static string ValidateGitId(string repoId, string what, string value)
    {
        if (!IsGitId(value))
            throw new HubDownloadException(
                $"The hub listed {what} '{Printable(value)}' in {repoId}, which is not a git object id (40 or 64 lowercase hex digits); refusing the listing.");
        return value;
    }

    /// <summary>Shows control characters of a hostile name as escapes, so an error message stays one line.</summary>
    internal static string Printable(string value) =>
        string.Concat(value.Take(120).Select(c => char.IsControl(c) ? $"\\u{(int)c:x4}" : c.ToString()));

    /// <summary>
    /// Rejects repository paths that could land outside the local folder (absolute, <c>..</c>, backslashes) or inside
    /// our bookkeeping folder; a hub is trusted for content, not for where it writes.
    /// </summary>
    public static string ValidateRelative(string repoId, string path)
    {
        var segments = path.Split('/');
        var bad = path.Length == 0 || path.StartsWith('/') || path.Contains('\\') || path.Any(char.IsControl)
                  || segments.Any(s => s is "" or "." or "..")
                  || (segments.Length > 1 && segments[0] == ".cache" && segments[1] == "vlmtune");
        if (bad)
            throw new HubDownloadException(
                $"The hub listed a file '{Printable(path)}' in {repoId} whose path is not a plain relative path; refusing to write it.");
        return path;
    }

    /// <summary>Escapes each path segment for a URL, keeping the slashes (like Python's <c>quote(path)</c>).</summary>
    public static string EscapePath(string path) => string.Join('/', path.Split('/').Select(Uri.EscapeDataString));
}
