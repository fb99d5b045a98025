namespace VlmTune.Vision;

/// <summary>
/// An 8-bit RGB image: <see cref="Pixels"/> holds Width × Height × 3 bytes, interleaved R,G,B, row-major, top row first
/// (the layout of a PIL "RGB" image as numpy sees it).
/// </summary>
public sealed class RgbImage
{
    public int Width { get; }
    public int Height { get; }
    public byte[] Pixels { get; }

    public RgbImage(int width, int height, byte[] pixels)
    {
        if (width < 1 || height < 1) throw new ArgumentOutOfRangeException(nameof(width), $"Image size must be at least 1x1, got {width}x{height}.");
        ArgumentNullException.ThrowIfNull(pixels);
        if (pixels.LongLength != (long)width * height * 3)
            throw new ArgumentException($"Expected {(long)width * height * 3} bytes for a {width}x{height} RGB image, got {pixels.LongLength}.", nameof(pixels));
        Width = width; Height = height; Pixels = pixels;
    }

    /// <summary>A black image of the given size.</summary>
    public RgbImage(int width, int height) : this(width, height, new byte[checked(width * height * 3)]) { }

    public int Stride => Width * 3;

    /// <summary>The R,G,B bytes of pixel (x, y).</summary>
    public (byte R, byte G, byte B) this[int x, int y]
    {
        get
        {
            int i = (y * Width + x) * 3;
            return (Pixels[i], Pixels[i + 1], Pixels[i + 2]);
        }
    }

    public ReadOnlySpan<byte> Row(int y) => Pixels.AsSpan(y * Stride, Stride);

    /// <summary>
    /// The sub-image with top-left corner (x, y), like PIL's <c>crop((x, y, x + width, y + height))</c>. The box must lie
    /// inside the image (PIL would pad outside with black; the tiling never asks for that).
    /// </summary>
    public RgbImage Crop(int x, int y, int width, int height)
    {
        if (x < 0 || y < 0 || width < 1 || height < 1 || x + width > Width || y + height > Height)
            throw new ArgumentOutOfRangeException(nameof(x), $"Crop box ({x},{y},{x + width},{y + height}) is not inside the {Width}x{Height} image.");
        var result = new RgbImage(width, height);
        for (int row = 0; row < height; row++)
            Pixels.AsSpan(((y + row) * Width + x) * 3, width * 3).CopyTo(result.Pixels.AsSpan(row * width * 3));
        return result;
    }

    public RgbImage Clone() => new(Width, Height, (byte[])Pixels.Clone());
}
