using System.Runtime.InteropServices;

namespace VlmTune.Cuda;

/// <summary>A CUDA library (driver or NVRTC) that could not be found or used; the message says where we looked.</summary>
public sealed class CudaException(string message) : VlmTuneException(message);

/// <summary>
/// Finds CUDA shared libraries the way the NCCL binding does: an explicit search whose failure lists every place tried,
/// rather than a DllNotFoundException from a DllImport resolver.
/// </summary>
public static class NativeSearch
{
    /// <summary>
    /// Where CUDA user-space libraries usually are: LD_LIBRARY_PATH; beside this app; CUDA_HOME / CUDA_PATH; libtorch's
    /// folder (LIBTORCH-style variables and any LD_LIBRARY_PATH entry ending in torch/lib) with PyTorch's wheel layout
    /// next to it (site-packages/nvidia/&lt;component&gt;/lib, nvidia/cu13/lib, nvidia/cu12/lib); /usr/local/cuda; the
    /// distribution's library folders.
    /// </summary>
    public static IReadOnlyList<string> DefaultDirectories(string wheelComponent, string? ldLibraryPath = null)
    {
        var dirs = new List<string>();
        var ld = (ldLibraryPath ?? Environment.GetEnvironmentVariable("LD_LIBRARY_PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries);
        dirs.AddRange(ld);
        dirs.Add(AppContext.BaseDirectory);
        foreach (var v in new[] { "CUDA_HOME", "CUDA_PATH" })
            if (Environment.GetEnvironmentVariable(v) is { Length: > 0 } root) { dirs.Add(Path.Combine(root, "lib64")); dirs.Add(Path.Combine(root, "lib")); }
        var torchLibs = new List<string>();
        foreach (var v in new[] { "LIBTORCH", "LIBTORCH_PATH", "TORCH_INSTALL_PREFIX" })
            if (Environment.GetEnvironmentVariable(v) is { Length: > 0 } root) torchLibs.Add(Path.Combine(root, "lib"));
        torchLibs.AddRange(ld);
        foreach (var dir in torchLibs)
        {
            var full = Path.GetFullPath(dir).TrimEnd('/');
            if (!full.EndsWith("torch/lib", StringComparison.Ordinal)) continue;
            dirs.Add(full);
            var nvidia = Path.GetFullPath(Path.Combine(full, "..", "..", "nvidia"));
            dirs.Add(Path.Combine(nvidia, wheelComponent, "lib"));
            dirs.Add(Path.Combine(nvidia, "cu13", "lib"));
            dirs.Add(Path.Combine(nvidia, "cu12", "lib"));
        }
        dirs.Add("/usr/local/cuda/lib64");
        dirs.Add("/usr/lib/x86_64-linux-gnu");
        dirs.Add("/usr/lib64");
        return dirs.Distinct().ToList();
    }

    /// <summary>
    /// Files in <paramref name="dir"/> named <paramref name="stem"/> or stem.N…, newest version first (libnvrtc.so.13
    /// before libnvrtc.so.12 before libnvrtc.so).
    /// </summary>
    public static IEnumerable<string> Versions(string dir, string stem)
    {
        if (!Directory.Exists(dir)) return [];
        return Directory.EnumerateFiles(dir, stem + "*")
            .Where(p => Path.GetFileName(p) is var n && (n == stem || n.StartsWith(stem + ".", StringComparison.Ordinal)))
            .OrderByDescending(p => VersionKey(Path.GetFileName(p)[stem.Length..]), VersionComparer.Instance);
    }

    private static int[] VersionKey(string suffix) =>
        suffix.Split('.', StringSplitOptions.RemoveEmptyEntries).Select(s => int.TryParse(s, out var n) ? n : 0).ToArray();

    private sealed class VersionComparer : IComparer<int[]>
    {
        public static readonly VersionComparer Instance = new();
        public int Compare(int[]? x, int[]? y)
        {
            for (int i = 0; i < Math.Max(x!.Length, y!.Length); i++)
            {
                int a = i < x.Length ? x[i] : -1, b = i < y.Length ? y[i] : -1;
                if (a != b) return a.CompareTo(b);
            }
            return 0;
        }
    }

    /// <summary>Loads the first library that loads: each directory's versions of <paramref name="stem"/>, then bare names.</summary>
    public static (string Path, IntPtr Handle) Load(string what, string stem, IEnumerable<string> directories, IEnumerable<string> bareNames, string advice)
    {
        var tried = new List<string>();
        foreach (var dir in directories)
        {
            var found = Versions(dir, stem).ToList();
            if (found.Count == 0) tried.Add(Path.Combine(dir, stem + "*"));
            foreach (var path in found)
            {
                tried.Add(path);
                if (NativeLibrary.TryLoad(path, out var handle)) return (path, handle);
            }
        }
        foreach (var name in bareNames)
        {
            tried.Add($"{name} (system loader)");
            if (NativeLibrary.TryLoad(name, out var handle)) return (name, handle);
        }
        throw new CudaException($"{what} ({stem}) was not found. Looked in:\n  " + string.Join("\n  ", tried) + "\n" + advice);
    }
}
