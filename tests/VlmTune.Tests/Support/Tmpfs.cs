using System.Diagnostics;

namespace VlmTune.Tests.Support;

/// <summary>
/// A small tmpfs mounted on a temporary folder, to run out of disk space for real. Mounting needs root (or
/// CAP_SYS_ADMIN); where it is not permitted, <see cref="TmpfsFactAttribute"/> skips the test and says why.
/// </summary>
public sealed class Tmpfs : IDisposable
{
    public string Dir { get; }

    private Tmpfs(string dir) => Dir = dir;

    public static Tmpfs Mount(long bytes) => TryMount(bytes, out var tmpfs, out var why) ? tmpfs! : throw new InvalidOperationException(why);

    private static bool TryMount(long bytes, out Tmpfs? tmpfs, out string why)
    {
        tmpfs = null;
        string dir = Directory.CreateTempSubdirectory("vlmtune-tmpfs-").FullName;
        var (code, output) = Run("mount", "-t", "tmpfs", "-o", $"size={bytes}", "tmpfs", dir);
        if (code != 0)
        {
            Directory.Delete(dir);
            why = $"mounting a tmpfs is not permitted here (mount: {output.Trim()}); run the tests as root to check disk-full handling";
            return false;
        }
        tmpfs = new Tmpfs(dir);
        why = "";
        return true;
    }

    internal static readonly Lazy<string?> Unavailable = new(() =>
    {
        if (!OperatingSystem.IsLinux()) return "tmpfs is Linux only";
        try
        {
            if (!TryMount(64 * 1024, out var probe, out var why)) return why;
            probe!.Dispose();
            return null;
        }
        catch (System.ComponentModel.Win32Exception e) { return $"cannot run mount ({e.Message})"; }
    });

    private static (int Code, string Output) Run(string file, params string[] args)
    {
        using var p = Process.Start(new ProcessStartInfo(file, args) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false })!;
        string output = p.StandardError.ReadToEnd() + p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, output);
    }

    public void Dispose()
    {
        if (Run("umount", Dir).Code != 0) Run("umount", "-l", Dir);   // lazily if a file is still open
        try { Directory.Delete(Dir); } catch (IOException) { }
    }
}

/// <summary>A fact that needs a tmpfs mount: skipped with the reason where mounting is not permitted.</summary>
public sealed class TmpfsFactAttribute : FactAttribute
{
    public TmpfsFactAttribute()
    {
        if (!Fixtures.Available && !Fixtures.UnderCi) Skip = Fixtures.MissingMessage;
        else if (Tmpfs.Unavailable.Value is { } why) Skip = why;
    }
}
