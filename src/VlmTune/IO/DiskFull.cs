namespace VlmTune.IO;

/// <summary>Out-of-space failures told apart from other I/O errors, so they are reported as what they are.</summary>
public static class DiskFull
{
    private const int Enospc = 28, Edquot = 122;

    /// <summary>
    /// True for ENOSPC or EDQUOT: .NET carries the errno as the HResult of a failed write, and reports a failed
    /// preallocation with its own message instead.
    /// </summary>
    public static bool Is(Exception e) => e is IOException io
        && (io.HResult is Enospc or Edquot || io.Message.Contains("because the disk was full", StringComparison.Ordinal));

    /// <summary>One line for a write that ran out of space: what, where, how much is left, and that nothing was published.</summary>
    public static VlmTuneException Error(string writing, string folder, string consequence, Exception inner)
    {
        string free = "";
        try
        {
            // On Unix DriveInfo takes any path and asks statvfs about its filesystem.
            free = $" ({FormatBytes(new DriveInfo(RealPath.Of(ExistingAncestor(folder))).AvailableFreeSpace)} left)";
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException) { }
        return new VlmTuneException($"disk full: writing {writing} in {folder} failed{free}; {consequence}. Free some space or write elsewhere.", inner);
    }

    private static string ExistingAncestor(string path)
    {
        var dir = Path.GetFullPath(path);
        while (!Directory.Exists(dir) && Path.GetDirectoryName(dir) is { } parent) dir = parent;
        return dir;
    }

    private static string FormatBytes(long bytes) => bytes switch
    {
        >= 1L << 30 => $"{bytes / (double)(1L << 30):F1} GiB",
        >= 1L << 20 => $"{bytes / (double)(1L << 20):F1} MiB",
        >= 1L << 10 => $"{bytes / 1024.0:F0} KiB",
        _ => $"{bytes} B",
    };
}
