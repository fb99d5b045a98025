using TorchSharp;
using static TorchSharp.torch;

namespace VlmTune.Vision;

/// <summary>
/// torchvision's <c>ToTensor()</c> + <c>Normalize(IMAGENET_MEAN, IMAGENET_STD)</c> as the official build_transform
/// applies them to each 448×448 tile, in float32 exactly as torch computes them: (x / 255 − mean) / std.
/// (Its <c>Resize((448, 448))</c> is a no-op on tiles that are already 448×448: Pillow returns a copy.)
/// </summary>
public static class ImageTransform
{
    public static readonly float[] ImageNetMean = [0.485f, 0.456f, 0.406f];
    public static readonly float[] ImageNetStd = [0.229f, 0.224f, 0.225f];

    /// <summary>
    /// Writes the size × size square of <paramref name="image"/> at (x0, y0) as normalised CHW floats into
    /// <paramref name="destination"/> (3 · size · size values).
    /// </summary>
    public static void NormalizeInto(RgbImage image, int x0, int y0, int size, Span<float> destination)
    {
        if (x0 < 0 || y0 < 0 || x0 + size > image.Width || y0 + size > image.Height)
            throw new ArgumentOutOfRangeException(nameof(x0), $"Square ({x0},{y0}) of side {size} is not inside the {image.Width}x{image.Height} image.");
        int plane = size * size;
        if (destination.Length < 3 * plane) throw new ArgumentException($"Need {3 * plane} floats, got {destination.Length}.", nameof(destination));

        // One lookup table per channel: the 256 possible results, computed with torch's float32 operation order.
        Span<float> lut = stackalloc float[3 * 256];
        for (int c = 0; c < 3; c++)
            for (int v = 0; v < 256; v++)
                lut[c * 256 + v] = (v / 255f - ImageNetMean[c]) / ImageNetStd[c];

        var r = destination.Slice(0, plane);
        var g = destination.Slice(plane, plane);
        var b = destination.Slice(2 * plane, plane);
        byte[] pixels = image.Pixels;
        for (int y = 0; y < size; y++)
        {
            int s = ((y0 + y) * image.Width + x0) * 3, d = y * size;
            for (int x = 0; x < size; x++, s += 3, d++)
            {
                r[d] = lut[pixels[s]];
                g[d] = lut[256 + pixels[s + 1]];
                b[d] = lut[512 + pixels[s + 2]];
            }
        }
    }

    /// <summary>Square tiles → float32 tensor [n, 3, size, size].</summary>
    public static Tensor ToTensor(IReadOnlyList<RgbImage> tiles)
    {
        if (tiles.Count == 0) throw new ArgumentException("No tiles to convert.", nameof(tiles));
        int size = tiles[0].Width;
        int tileFloats = 3 * size * size;
        var data = new float[tiles.Count * tileFloats];
        for (int t = 0; t < tiles.Count; t++)
        {
            if (tiles[t].Width != size || tiles[t].Height != size)
                throw new ArgumentException($"Tile {t} is {tiles[t].Width}x{tiles[t].Height}, expected {size}x{size}.", nameof(tiles));
            NormalizeInto(tiles[t], 0, 0, size, data.AsSpan(t * tileFloats, tileFloats));
        }
        return torch.tensor(data, [tiles.Count, 3, size, size]); // [n, 3, H, W]
    }
}
