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
        _rootReal = IO.RealPath.Of(Root);
    }

    public string Root { get; }

    /// <summary>The full path of <paramref name="relative"/>, or an error message saying how it escapes the root.</summary>
    public (string? Path, string? Error) Resolve(string relative)
    {
        if (string.IsNullOrWhiteSpace(relative)) return (null, "empty image path");
        if (Path.IsPathRooted(relative) || relative.StartsWith('~'))
            return (null, $"image path '{relative}' is absolute; write it relative to the image root {Root}");
        var full = Path.GetFullPath(Path.Combine(Root, relative));
        if (!IO.RealPath.IsSameOrInsideResolved(full, Root))
            return (null, $"image path '{relative}' leaves the image root {Root} through '..'");
        var real = IO.RealPath.Of(full);
        if (!IO.RealPath.IsSameOrInsideResolved(real, _rootReal))
            return (null, $"image path '{relative}' leads through a symlink to {real}, outside the image root {Root}");
        return (full, null);
    }
}
