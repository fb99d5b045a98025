using System.Globalization;
using System.Text.Json;

namespace VlmTune.Hub;

/// <summary>
/// The bookkeeping of a local download folder, under <c>DIR/.cache/vlmtune/download/</c> (like huggingface_hub's
/// <c>.cache/huggingface/download/</c>): per file <c>PATH.metadata</c> (commit, etag, size and time of a completed
/// download), <c>PATH.lock</c> (held while a process works on the file) and <c>PATH.ETAG.incomplete</c> (bytes so far);
/// for the repo, <c>.manifest.json</c> (the last listing, which offline mode checks the folder against).
/// </summary>
internal sealed class LocalDownloadFolder(string localDir)
{
    public string LocalDir { get; } = localDir;
    public string Root { get; } = Path.Combine(localDir, ".cache", "vlmtune", "download");
    public string ManifestPath => Path.Combine(Root, ".manifest.json");

    public sealed record FilePaths(string Final, string Lock, string Metadata, string Partial);

    public sealed record Metadata(string Commit, string Etag, long Size, double Timestamp);

    public FilePaths PathsFor(HubFile file)
    {
        // Listings are checked when parsed; this is where names meet paths, so a saved manifest is checked too.
        var native = HubPaths.ValidateRelative(LocalDir, file.Path).Replace('/', Path.DirectorySeparatorChar);
        var book = Path.Combine(Root, native);
        // The etag in the partial's name keeps bytes of an older version of the file from being resumed.
        var etag = file.Etag is { Length: > 0 } e ? e : "unknown";
        if (!HubPaths.IsGitId(etag) && etag != "unknown")
            throw new HubDownloadException($"The etag '{HubPaths.Printable(etag)}' of {file.Path} is not a git object id or sha256; refusing to name a file after it.");
        return new FilePaths(Path.Combine(LocalDir, native), book + ".lock", book + ".metadata", $"{book}.{etag}.incomplete");
    }

    /// <summary>Partials of this file left for another etag (the file changed on the hub since): dead bytes.</summary>
    public static void DeleteStalePartials(FilePaths paths)
    {
        var dir = Path.GetDirectoryName(paths.Partial)!;
        if (!Directory.Exists(dir)) return;
        var prefix = Path.GetFileName(paths.Metadata)[..^".metadata".Length] + ".";
        foreach (var stale in Directory.EnumerateFiles(dir, prefix + "*.incomplete"))
            if (stale != paths.Partial && !Path.GetFileName(stale)[prefix.Length..^".incomplete".Length].Contains('.'))
                File.Delete(stale);
    }

    /// <summary>
    /// True when the file is under its final name with metadata for the same content (etag, else commit) and size, and
    /// was not modified after the metadata was written.
    /// </summary>
    public static bool IsComplete(HubFile file, string commit, FilePaths paths)
    {
        var meta = ReadMetadata(paths);
        var final = new FileInfo(paths.Final);
        if (meta is null || !final.Exists) return false;
        var sameContent = file.Etag is { Length: > 0 } ? meta.Etag == file.Etag : meta.Commit == commit;
        var sameSize = final.Length == meta.Size && (file.Size is null || file.Size == final.Length);
        var untouched = ToUnixSeconds(final.LastWriteTimeUtc) - 1 <= meta.Timestamp; // mtime may be coarse
        return sameContent && sameSize && untouched;
    }

    public static Metadata? ReadMetadata(FilePaths paths)
    {
        try
        {
            var lines = File.ReadAllLines(paths.Metadata);
            if (lines.Length < 4) return null;
            return new Metadata(lines[0], lines[1], long.Parse(lines[2], CultureInfo.InvariantCulture),
                double.Parse(lines[3], CultureInfo.InvariantCulture));
        }
        catch (Exception e) when (e is IOException or FormatException or OverflowException or UnauthorizedAccessException)
        {
            return null; // missing or unreadable metadata only means the file is checked again
        }
    }

    public static void WriteMetadata(FilePaths paths, string commit, string? etag, long size)
    {
        var now = ToUnixSeconds(DateTime.UtcNow).ToString("0.000", CultureInfo.InvariantCulture);
        WriteAtomically(paths.Metadata, $"{commit}\n{etag ?? ""}\n{size.ToString(CultureInfo.InvariantCulture)}\n{now}\n");
    }

    private sealed record ManifestFile(string Path, long? Size, string? Sha256, string? Etag);

    private sealed record Manifest(string Source, string RepoId, string Revision, string Commit, string Endpoint, List<ManifestFile> Files);

    private static readonly JsonSerializerOptions ManifestJson = new() { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.CamelCase };

    public void WriteManifest(HubSettings settings, HubRepoListing listing)
    {
        var manifest = new Manifest(settings.Source.Name(), listing.RepoId, listing.Revision, listing.Commit, settings.Endpoint,
            listing.Files.Select(f => new ManifestFile(f.Path, f.Size, f.Sha256, f.Etag)).ToList());
        WriteAtomically(ManifestPath, JsonSerializer.Serialize(manifest, ManifestJson));
    }

    /// <summary>The last listing saved here, with the source it came from; null when none was.</summary>
    public (HubSource Source, HubRepoListing Listing)? ReadManifest()
    {
        if (!File.Exists(ManifestPath)) return null;
        HubDownloadException Damaged(string why, Exception? inner = null) =>
            new($"{ManifestPath} is damaged ({why}); rerun without HF_HUB_OFFLINE to rewrite it.", inner);
        Manifest? m;
        try { m = JsonSerializer.Deserialize<Manifest>(File.ReadAllText(ManifestPath), ManifestJson); }
        catch (JsonException e) { throw Damaged(e.Message, e); }
        // The deserializer leaves absent or null fields null whatever the record says.
        if (m is null) throw Damaged("null instead of an object");
        var missing = new[] { ("source", (object?)m.Source), ("repoId", m.RepoId), ("revision", m.Revision), ("commit", m.Commit), ("files", m.Files) }
            .Where(f => f.Item2 is null).Select(f => f.Item1).ToList();
        if (m.Files?.Any(f => f is null || f.Path is null) == true) missing.Add("files[].path");
        if (missing.Count > 0) throw Damaged($"no {string.Join(", ", missing)}");
        HubSource source;
        try { source = HubSourceNames.Parse(m.Source); }
        catch (VlmTuneException) { throw Damaged($"unknown source '{m.Source}'"); }
        var files = m.Files!.Select(f => new HubFile(f.Path, f.Size, f.Sha256, f.Etag)).ToList();
        return (source, new HubRepoListing(m.RepoId, m.Revision, m.Commit, files));
    }

    /// <summary>Writes beside the target and renames over it, so readers see the old or the new content, never half.</summary>
    private static void WriteAtomically(string path, string content)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        var temp = IO.OwnedTemporary.Beside(path);
        try
        {
            File.WriteAllText(temp, content);
            File.Move(temp, path, overwrite: true);
        }
        catch
        {
            try { File.Delete(temp); } catch (IOException) { }
            throw;
        }
    }

    /// <summary>Temporary files of bookkeeping writes that killed processes left (partials are kept: they resume).</summary>
    public IReadOnlyList<string> RemoveStaleTemporaries() =>
        IO.OwnedTemporary.RemoveStale(Root, n => n.Contains(".tmp-", StringComparison.Ordinal), recursive: true);

    private static double ToUnixSeconds(DateTime utc) => (utc - DateTime.UnixEpoch).TotalSeconds;
}
