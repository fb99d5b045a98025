using System.Runtime.InteropServices;

namespace VlmTune.IO;

/// <summary>
/// Paths as the files they name, for every "never write over an input" check: each component's symlink is followed
/// and <c>..</c> is taken after the link before it, as the kernel does, so a link or another spelling cannot make an
/// output look unrelated to the input it replaces. Strings given by the user are never compared directly.
/// </summary>
public static partial class RealPath
{
    private const int MaxLinks = 40;   // Linux's MAXSYMLINKS

    /// <summary>The absolute path with every symlink along it followed; components that do not exist are kept as written.</summary>
    public static string Of(string path)
    {
        int links = 0;
        return Resolve(Path.IsPathRooted(path) ? path : Path.Join(Environment.CurrentDirectory, path), ref links, path);
    }

    /// <summary>True when <paramref name="path"/> is <paramref name="folder"/> or lies inside it, after both are resolved.</summary>
    public static bool IsSameOrInside(string path, string folder) => IsSameOrInsideResolved(Of(path), Of(folder));

    /// <summary>True when one of the two is the other or lies inside it (replacing either would touch the other).</summary>
    public static bool Overlap(string a, string b)
    {
        string ra = Of(a), rb = Of(b);
        return IsSameOrInsideResolved(ra, rb) || IsSameOrInsideResolved(rb, ra);
    }

    /// <summary>
    /// True when both paths name one existing file or folder (same device and inode): also a hard link, which no path
    /// comparison can tell.
    /// </summary>
    public static bool SameFile(string a, string b) =>
        Identity(a) is { } x && Identity(b) is { } y && x == y;

    /// <summary>Device and inode of an existing file (symlinks followed); null when it does not exist or cannot be read.</summary>
    public static (ulong Device, ulong Inode)? Identity(string path)
    {
        if (!OperatingSystem.IsLinux()) return null;
        Span<byte> buffer = stackalloc byte[256];
        unsafe
        {
            fixed (byte* b = buffer)
                if (statx(AtFdCwd, path, 0, StatxIno, b) != 0) return null;
        }
        // struct statx: stx_ino at byte 32, stx_dev_major / stx_dev_minor at 136 / 140 (one layout on every architecture).
        ulong inode = BitConverter.ToUInt64(buffer[32..]);
        ulong device = ((ulong)BitConverter.ToUInt32(buffer[136..]) << 32) | BitConverter.ToUInt32(buffer[140..]);
        return (device, inode);
    }

    internal static bool IsSameOrInsideResolved(string path, string folder)
    {
        folder = Path.TrimEndingDirectorySeparator(folder);
        path = Path.TrimEndingDirectorySeparator(path);
        return path == folder || folder == "/" || path.StartsWith(folder + Path.DirectorySeparatorChar, StringComparison.Ordinal);
    }

    private static string Resolve(string absolute, ref int links, string original)
    {
        string current = Path.GetPathRoot(absolute)!;
        foreach (var part in absolute[current.Length..].Split(Path.DirectorySeparatorChar, StringSplitOptions.RemoveEmptyEntries))
        {
            if (part == ".") continue;
            if (part == "..") { current = Path.GetDirectoryName(current) ?? current; continue; }   // current is real: its parent is
            string next = Path.Join(current, part);
            string? target;
            try { target = new FileInfo(next).LinkTarget; }   // lstat: set for links to folders, files and nothing alike
            catch (IOException) { target = null; }             // e.g. a component under a file: not a link
            catch (UnauthorizedAccessException) { target = null; }
            if (target is null) { current = next; continue; }
            if (++links > MaxLinks) throw new VlmTuneException($"{original}: too many levels of symbolic links.");
            current = Resolve(Path.IsPathRooted(target) ? target : Path.Join(current, target), ref links, original);
        }
        return current;
    }

    private const int AtFdCwd = -100;
    private const uint StatxIno = 0x100;

    [LibraryImport("libc", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static unsafe partial int statx(int dirfd, string path, int flags, uint mask, byte* buffer);
}
