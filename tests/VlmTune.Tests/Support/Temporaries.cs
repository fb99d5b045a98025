using System.Diagnostics;
using VlmTune.IO;

namespace VlmTune.Tests.Support;

/// <summary>Temporaries as a killed process (its pid gone) or a live one would have left them, for cleanup tests.</summary>
public static class Temporaries
{
    private static readonly Lazy<int> DeadPid = new(() =>
    {
        using var p = Process.Start(new ProcessStartInfo("true") { UseShellExecute = false })!;
        p.WaitForExit();
        return p.Id;
    });

    private static string Host => OwnedTemporary.Owner[(OwnedTemporary.Owner.IndexOf('@') + 1)..];

    /// <summary><paramref name="stem"/> with the tag of a process that has exited.</summary>
    public static string OfDeadProcess(string stem) => $"{stem}{DeadPid.Value}@{Host}-{Guid.NewGuid():N}";

    /// <summary><paramref name="stem"/> with the tag of a process that has exited on another host (not ours to judge).</summary>
    public static string OfOtherHost(string stem) => $"{stem}{DeadPid.Value}@other-host.example-{Guid.NewGuid():N}";

    /// <summary><paramref name="stem"/> with this (live) test process's tag.</summary>
    public static string OfLiveProcess(string stem) => OwnedTemporary.Name(stem);

    /// <summary>A folder with a file in it, as a half-written checkpoint or merge leaves it.</summary>
    public static string Folder(string path)
    {
        Directory.CreateDirectory(path);
        File.WriteAllText(Path.Combine(path, "part.bin"), "half-written");
        return path;
    }
}
