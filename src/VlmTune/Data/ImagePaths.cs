namespace VlmTune.Data;

/// <summary>
/// Resolves image paths written in data files against an image root, refusing any that would read outside it:
/// absolute paths, <c>..</c> that climbs above the root, and symlinks (of the file or a folder on the way) whose
/// target lies outside. A data file must not be able to make training read arbitrary files.
/// </summary>
public sealed class ImagePaths
{
    private readonly string _rootReal;

    public ImagePaths(string root)
    {
        Root = Path.GetFullPath(root);
        _rootReal = RealPath(Root);
    }

    public string Root { get; }

    /// <summary>The full path of <paramref name="relative"/>, or an error message saying how it escapes the root.</summary>
    public (string? Path, string? Error) Resolve(string relative)
    {
        if (string.IsNullOrWhiteSpace(relative)) return (null, "empty image path");
        if (Path.IsPathRooted(relative) || relative.StartsWith('~'))
            return (null, $"image path '{relative}' is absolute; write it relative to the image root {Root}");
        var full = Path.GetFullPath(Path.Combine(Root, relative));
        if (!IsInside(full, Root))
            return (null, $"image path '{relative}' leaves the image root {Root} through '..'");
        var real = RealPath(full);
        if (!IsInside(real, _rootReal))
            return (null, $"image path '{relative}' leads through a symlink to {real}, outside the image root {Root}");
        return (full, null);
    }

    private static bool IsInside(string path, string root)
    {
        var prefix = root.EndsWith(Path.DirectorySeparatorChar) ? root : root + Path.DirectorySeparatorChar;
        return path.StartsWith(prefix, StringComparison.Ordinal) || path == root;
    }

    /// <summary>The path with every symlink along it followed; parts that do not exist are kept as written.</summary>
    private static string RealPath(string fullPath, int depth = 0)
    {
        if (depth > 40) throw new VlmTuneException($"too many levels of symlinks resolving {fullPath}");
        var root = Path.GetPathRoot(fullPath)!;
        var current = root;
        foreach (var part in fullPath[root.Length..].Split(Path.DirectorySeparatorChar, StringSplitOptions.RemoveEmptyEntries))
        {
            var next = Path.Combine(current, part);
            // LinkTarget comes from lstat: set for links to folders, files and nothing (dangling) alike.
            var linkTarget = new FileInfo(next).LinkTarget;
            current = linkTarget is null ? next : RealPath(Path.GetFullPath(linkTarget, current), depth + 1);
        }
        return current;
    }
}
