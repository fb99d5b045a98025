using System.Diagnostics;
using System.Text.RegularExpressions;

namespace VlmTune.IO;

/// <summary>
/// Names of temporary files and folders that say who writes them (<c>PID@HOST-ID</c> at the end), so that a later run
/// can remove what a killed process left behind (a <c>kill -9</c>, a crash, a power cut) and never touches what a
/// live process is still writing. Temporaries of another host (a shared filesystem) are left alone: their process
/// cannot be checked from here.
/// </summary>
public static partial class OwnedTemporary
{
    /// <summary>This process's owner tag.</summary>
    public static string Owner => $"{Environment.ProcessId}@{Host}";

    private static readonly string Host = SafeHost(Environment.MachineName);

    /// <summary><paramref name="stem"/> followed by this process's tag and a unique id.</summary>
    public static string Name(string stem) => $"{stem}{Owner}-{Guid.NewGuid():N}";

    /// <summary>A temporary sibling of <paramref name="finalPath"/>: <c>FINAL.tmp-PID@HOST-ID</c>, renamed over it once complete.</summary>
    public static string Beside(string finalPath) => Name(finalPath + ".tmp-");

    /// <summary>
    /// Deletes the entries of <paramref name="directory"/> (files, or folders with their content) whose name satisfies
    /// <paramref name="belongs"/> and ends in an owner tag of this host whose process is gone. Returns the paths removed.
    /// </summary>
    public static IReadOnlyList<string> RemoveStale(string directory, Func<string, bool> belongs, bool recursive = false)
    {
        var removed = new List<string>();
        if (!Directory.Exists(directory)) return removed;
        var entries = Directory.EnumerateFileSystemEntries(directory, "*",
            new EnumerationOptions { RecurseSubdirectories = recursive, IgnoreInaccessible = true, AttributesToSkip = 0 });
        foreach (var path in entries.ToList())
        {
            string name = Path.GetFileName(path);
            if (!belongs(name) || !IsStale(name)) continue;
            try
            {
                // A symlink is removed itself, never followed.
                if (Directory.Exists(path) && new DirectoryInfo(path).LinkTarget is null) Directory.Delete(path, recursive: true);
                else File.Delete(path);
                removed.Add(path);
            }
            catch (IOException) { }                  // in use or vanished: the next run tries again
            catch (UnauthorizedAccessException) { }
        }
        return removed;
    }

    /// <summary>True when <paramref name="name"/> ends in a tag of this host whose process no longer runs.</summary>
    public static bool IsStale(string name)
    {
        var m = TagRegex().Match(name);
        return m.Success && m.Groups["host"].Value == Host && int.TryParse(m.Groups["pid"].Value, out int pid) && !IsRunning(pid);
    }

    /// <summary>Whether a process with this id exists here (a zombie or a reused id counts: never delete on doubt).</summary>
    public static bool IsRunning(int pid)
    {
        if (pid == Environment.ProcessId) return true;
        if (pid <= 0) return false;
        if (Directory.Exists("/proc/self")) return Directory.Exists($"/proc/{pid}");
        try { using var p = Process.GetProcessById(pid); return !p.HasExited; }
        catch (ArgumentException) { return false; }
        catch (InvalidOperationException) { return false; }
    }

    // Host names are letters, digits, '-' and '.'; anything else (never expected) becomes '_' so names stay parseable.
    private static string SafeHost(string host) => HostCharRegex().Replace(host, "_");

    [GeneratedRegex(@"(?<pid>\d+)@(?<host>[A-Za-z0-9._-]+)-[0-9a-f]{32}$")]
    private static partial Regex TagRegex();

    [GeneratedRegex(@"[^A-Za-z0-9.\-]")]
    private static partial Regex HostCharRegex();
}
