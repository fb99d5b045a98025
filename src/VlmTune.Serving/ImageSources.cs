using System.Runtime.InteropServices;

namespace VlmTune.Serving;

/// <summary>
/// Turns an <c>image_url</c> into bytes: <c>data:</c> URLs always; http(s) only when remote images are allowed (through
/// <see cref="RemoteImageFetcher"/>); local paths and <c>file://</c> URLs only under the allowed folder, checked on the
/// real path of the file actually opened, so neither <c>..</c> nor a symlink leads outside it.
/// </summary>
public sealed class ImageSources(ServerOptions options, RemoteImageFetcher fetcher)
{
    private readonly string? _localRoot = options.AllowLocalImages is { } root ? RealPath(Path.GetFullPath(root)) : null;

    public async Task<byte[]> ReadAsync(string url, CancellationToken cancellation)
    {
        if (url.StartsWith("data:", StringComparison.OrdinalIgnoreCase)) return DecodeDataUrl(url);
        if (url.StartsWith("http://", StringComparison.OrdinalIgnoreCase) || url.StartsWith("https://", StringComparison.OrdinalIgnoreCase))
        {
            if (!options.AllowRemoteImages)
                throw ApiException.BadRequest("image_url: remote image URLs are disabled on this server; send the image as a data: URL.", "image_url", "invalid_image_url");
            if (!Uri.TryCreate(url, UriKind.Absolute, out var uri)) throw ApiException.BadRequest("image_url: not a valid URL.", "image_url", "invalid_image_url");
            return await fetcher.FetchAsync(uri, cancellation).ConfigureAwait(false);
        }
        if (url.StartsWith("file:", StringComparison.OrdinalIgnoreCase) || url.StartsWith('/') || !url.Contains(':'))
            return ReadLocal(url);
        throw ApiException.BadRequest("image_url: unsupported URL scheme; use a data: URL" + (options.AllowRemoteImages ? " or http(s)." : "."), "image_url", "invalid_image_url");
    }

    private byte[] DecodeDataUrl(string url)
    {
        int comma = url.IndexOf(',');
        if (comma < 0) throw ApiException.BadRequest("image_url: malformed data: URL (no comma).", "image_url", "invalid_image_url");
        var meta = url[5..comma].Split(';');
        if (!meta.Contains("base64", StringComparer.OrdinalIgnoreCase))
            throw ApiException.BadRequest("image_url: data: URLs must be base64-encoded (data:image/png;base64,...).", "image_url", "invalid_image_url");
        if (meta[0].Length > 0 && !meta[0].StartsWith("image/", StringComparison.OrdinalIgnoreCase))
            throw ApiException.BadRequest($"image_url: data: URL media type must be image/* (got '{Clip(meta[0])}').", "image_url", "invalid_image_url");
        var payload = url.AsSpan(comma + 1);
        // Size from the encoded length, before allocating the decoded bytes.
        if ((long)payload.Length / 4 * 3 > options.MaxImageBytes + 3)
            throw ApiException.BadRequest($"image_url: the image is larger than this server's limit of {options.MaxImageBytes:N0} bytes.", "image_url", "image_too_large");
        var bytes = new byte[payload.Length / 4 * 3 + 3];
        if (!Convert.TryFromBase64Chars(payload, bytes, out int written))
            throw ApiException.BadRequest("image_url: the data: URL is not valid base64.", "image_url", "invalid_image_url");
        if (written == 0) throw ApiException.BadRequest("image_url: the data: URL holds no bytes.", "image_url", "invalid_image_url");
        return bytes.AsSpan(0, written).ToArray();
    }

    private byte[] ReadLocal(string url)
    {
        if (_localRoot is null)
            throw ApiException.BadRequest("image_url: local image paths are disabled on this server; send the image as a data: URL.", "image_url", "invalid_image_url");
        string path;
        if (url.StartsWith("file:", StringComparison.OrdinalIgnoreCase))
        {
            if (!Uri.TryCreate(url, UriKind.Absolute, out var uri) || !uri.IsFile || !string.IsNullOrEmpty(uri.Host))
                throw ApiException.BadRequest("image_url: malformed file: URL (use file:///path).", "image_url", "invalid_image_url");
            path = Uri.UnescapeDataString(uri.AbsolutePath);
        }
        else path = url;
        if (path.Split('/', '\\').Any(part => part == "..") || path.Contains('\0'))
            throw ApiException.BadRequest("image_url: '..' is not allowed in image paths.", "image_url", "invalid_image_url");
        var full = Path.GetFullPath(Path.IsPathRooted(path) ? path : Path.Combine(_localRoot, path));
        var outside = ApiException.BadRequest("image_url: the path is outside the folder this server may read images from.", "image_url", "image_path_forbidden");
        if (!IsUnder(full, _localRoot)) throw outside;
        var notFound = ApiException.BadRequest("image_url: no readable image file at that path.", "image_url", "invalid_image_url");
        var notRegular = ApiException.BadRequest("image_url: that path is not a regular file.", "image_url", "invalid_image_url");
        // Opening a FIFO for reading blocks until someone writes to it, and a device reads forever: the type is
        // checked on the resolved path before any open, and again on the handle (opened non-blocking) against a swap.
        var resolved = RealPath(full);
        if (!IsUnder(resolved, _localRoot)) throw outside;
        if (OperatingSystem.IsLinux())
        {
            var type = FileType.Of(resolved);
            if (type != FileType.Kind.Regular) throw type == FileType.Kind.Missing ? notFound : notRegular;
        }
        FileStream stream;
        try { stream = OperatingSystem.IsLinux() ? FileType.OpenRegularNonBlocking(resolved) : new FileStream(full, FileMode.Open, FileAccess.Read, FileShare.Read, 1, FileOptions.None); }
        catch (FileType.NotRegularException) { throw notRegular; }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw notFound; }
        using (stream)
        {
            // What was opened, after every symlink: checked on the open handle, so a swapped link cannot race us.
            var real = OpenedPath(stream) ?? RealPath(full);
            if (!IsUnder(real, _localRoot)) throw outside;
            if (stream.Length > options.MaxImageBytes)
                throw ApiException.BadRequest($"image_url: the image is larger than this server's limit of {options.MaxImageBytes:N0} bytes.", "image_url", "image_too_large");
            var bytes = new byte[stream.Length];
            stream.ReadExactly(bytes);
            return bytes;
        }
    }

    private static bool IsUnder(string path, string root) =>
        path.StartsWith(root.EndsWith('/') ? root : root + "/", StringComparison.Ordinal);

    private static string? OpenedPath(FileStream stream)
    {
        if (!OperatingSystem.IsLinux()) return null;
        var fd = stream.SafeFileHandle.DangerousGetHandle().ToInt32();
        try { return new FileInfo($"/proc/self/fd/{fd}").LinkTarget; }
        catch (IOException) { return null; }
    }

    /// <summary>The path with every symlink of every component resolved.</summary>
    internal static string RealPath(string path)
    {
        var parts = path.Split('/', StringSplitOptions.RemoveEmptyEntries);
        var current = "/";
        for (int i = 0; i < parts.Length; i++)
        {
            var next = Path.Combine(current, parts[i]);
            for (int hops = 0; hops < 40; hops++)
            {
                FileSystemInfo info = Directory.Exists(next) ? new DirectoryInfo(next) : new FileInfo(next);
                if (info.LinkTarget is not { } target) break;
                next = Path.GetFullPath(Path.IsPathRooted(target) ? target : Path.Combine(Path.GetDirectoryName(next)!, target));
            }
            current = next;
        }
        return current;
    }

    private static string Clip(string s) => s.Length <= 40 ? s : s[..40] + "…";
}

/// <summary>File types through statx(2) (one struct layout on every Linux architecture), which .NET does not expose.</summary>
internal static class FileType
{
    public enum Kind { Missing, Regular, Other }

    public sealed class NotRegularException() : IOException("not a regular file");

    private const int AtFdCwd = -100, AtSymlinkNoFollow = 0x100, AtEmptyPath = 0x1000;
    private const uint StatxType = 0x1;
    private const int ModeOffset = 28;   // struct statx: mask, blksize (u32), attributes (u64), nlink, uid, gid (u32), mode (u16)
    private const int ReadOnly = 0, NonBlocking = 0x800, CloseOnExec = 0x80000;

    [DllImport("libc", SetLastError = true)]
    private static extern int statx(int dirfd, string path, int flags, uint mask, byte[] buffer);

    [DllImport("libc", EntryPoint = "open", SetLastError = true)]
    private static extern int Open(string path, int flags);

    /// <summary>The type of the path itself (a symlink is Other: resolve first).</summary>
    public static Kind Of(string path) => Stat(AtFdCwd, path, AtSymlinkNoFollow);

    /// <summary>
    /// Opens for reading without blocking on a FIFO, then checks the opened file (not the name) is regular.
    /// Throws <see cref="NotRegularException"/> or an <see cref="IOException"/>.
    /// </summary>
    public static FileStream OpenRegularNonBlocking(string path)
    {
        int fd = Open(path, ReadOnly | NonBlocking | CloseOnExec);
        if (fd < 0) throw new IOException($"open failed (errno {Marshal.GetLastPInvokeError()})");
        var handle = new Microsoft.Win32.SafeHandles.SafeFileHandle((IntPtr)fd, ownsHandle: true);
        try
        {
            if (Stat(fd, "", AtEmptyPath) != Kind.Regular) throw new NotRegularException();
            return new FileStream(handle, FileAccess.Read, 1);
        }
        catch { handle.Dispose(); throw; }
    }

    private static Kind Stat(int dirfd, string path, int flags)
    {
        var buffer = new byte[256];
        if (statx(dirfd, path, flags, StatxType, buffer) != 0) return Kind.Missing;
        return (BitConverter.ToUInt16(buffer, ModeOffset) & 0xF000) == 0x8000 ? Kind.Regular : Kind.Other;
    }
}
