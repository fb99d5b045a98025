namespace VlmTune.Vision;

/// <summary>
/// Size limits checked from the image header before any pixel is decoded, so a small file claiming a huge canvas
/// (a decompression bomb) is refused without allocating it. Policy on minimum sizes belongs to callers (server, data
/// validation); decoding accepts anything from 1x1.
/// </summary>
public sealed record ImageLimits
{
    /// <summary>PIL refuses images above 2 × MAX_IMAGE_PIXELS (89,478,485) with DecompressionBombError; we use the same bound.</summary>
    public const long DefaultMaxPixels = 178_956_970;

    /// <summary>Largest Width × Height accepted.</summary>
    public long MaxPixels { get; init; } = DefaultMaxPixels;

    /// <summary>Largest width or height accepted (on top of <see cref="MaxPixels"/>; guards very thin images).</summary>
    public int MaxSide { get; init; } = 65_500;

    public static ImageLimits Default { get; } = new();

    /// <summary>Throws <see cref="ImageException"/> naming <paramref name="source"/> when the size breaks a limit.</summary>
    public void Check(int width, int height, string source)
    {
        if (width < 1 || height < 1)
            throw new ImageException($"{source}: image has an empty size {width}x{height}.");
        long pixels = (long)width * height;
        if (pixels > MaxPixels)
            throw new ImageException($"{source}: image is {width}x{height} = {pixels:N0} pixels, above the limit of {MaxPixels:N0} pixels " +
                                     "(possible decompression bomb); resize it or raise ImageLimits.MaxPixels.");
        if (width > MaxSide || height > MaxSide)
            throw new ImageException($"{source}: image is {width}x{height}, a side is above the limit of {MaxSide:N0} pixels; resize it or raise ImageLimits.MaxSide.");
    }
}
