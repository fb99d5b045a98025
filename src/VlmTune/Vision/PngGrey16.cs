using System.Buffers.Binary;
using System.IO.Compression;

namespace VlmTune.Vision;

/// <summary>
/// 16-bit greyscale PNGs, the one common input where Skia and PIL disagree: PIL opens them as mode I;16 and
/// <c>convert('RGB')</c> clips each sample to 255 (values ≥ 256 become white), while Skia keeps the high byte. To give
/// the model what the official pipeline gives it, these files are decoded here: chunk walk, zlib, PNG row filters and
/// Adam7 interlacing for this single pixel format.
/// </summary>
internal static class PngGrey16
{
    private static ReadOnlySpan<byte> Signature => [0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A];

    // Adam7 passes: first column, first row, column step, row step.
    private static readonly (int X, int Y, int Dx, int Dy)[] Adam7 =
        [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)];

    /// <summary>True when <paramref name="data"/> is a PNG whose IHDR says bit depth 16, colour type 0 (grey).</summary>
    public static bool Matches(ReadOnlySpan<byte> data) =>
        data.Length >= 29 && data[..8].SequenceEqual(Signature) && data.Slice(12, 4).SequenceEqual("IHDR"u8)
        && data[24] == 16 && data[25] == 0;

    public static RgbImage Decode(ReadOnlySpan<byte> data, string sourceName)
    {
        int width = BinaryPrimitives.ReadInt32BigEndian(data[16..]);
        int height = BinaryPrimitives.ReadInt32BigEndian(data[20..]);
        bool interlaced = data[28] == 1;

        var compressed = new MemoryStream();
        int pos = 8;
        bool ended = false;
        while (pos + 12 <= data.Length)
        {
            int length = BinaryPrimitives.ReadInt32BigEndian(data[pos..]);
            if (length < 0 || pos + 12L + length > data.Length) break;
            var type = data.Slice(pos + 4, 4);
            if (type.SequenceEqual("IDAT"u8)) compressed.Write(data.Slice(pos + 8, length));
            if (type.SequenceEqual("IEND"u8)) { ended = true; break; }
            pos += 12 + length;
        }
        if (compressed.Length == 0) throw new ImageException($"{sourceName}: PNG has no image data (the file is truncated or corrupt).");

        long rawSize = 0;
        foreach (var (pw, ph) in Passes(width, height, interlaced)) rawSize += (long)ph * (1 + 2L * pw);
        if (rawSize > Array.MaxLength) throw new ImageException($"{sourceName}: image is {width}x{height}, too large to decode in memory.");
        var raw = new byte[rawSize];
        compressed.Position = 0;
        try
        {
            using var z = new ZLibStream(compressed, CompressionMode.Decompress);
            int read = 0, n;
            while (read < raw.Length && (n = z.Read(raw, read, raw.Length - read)) > 0) read += n;
            if (read < raw.Length)
                throw new ImageException($"{sourceName}: cannot decode PNG image ({width}x{height}): the file is truncated" +
                                         (ended ? "." : " (no IEND chunk)."));
        }
        catch (InvalidDataException e) { throw new ImageException($"{sourceName}: cannot decode PNG image ({width}x{height}): the file is corrupt ({e.Message}).", e); }

        var image = new RgbImage(width, height);
        int offset = 0, pass = 0;
        foreach (var (pw, ph) in Passes(width, height, interlaced))
        {
            var (x0, y0, dx, dy) = interlaced ? Adam7[pass] : (0, 0, 1, 1);
            pass++;
            if (pw == 0 || ph == 0) continue;
            int rowBytes = 2 * pw;
            Unfilter(raw.AsSpan(offset, ph * (1 + rowBytes)), rowBytes, ph, sourceName);
            for (int r = 0; r < ph; r++)
            {
                var row = raw.AsSpan(offset + r * (1 + rowBytes) + 1, rowBytes);
                int y = y0 + r * dy;
                for (int c = 0; c < pw; c++)
                {
                    // PIL's I;16 → RGB: the sample if it fits in a byte, else 255.
                    byte v = row[2 * c] == 0 ? row[2 * c + 1] : (byte)255;
                    int i = (y * width + x0 + c * dx) * 3;
                    image.Pixels[i] = image.Pixels[i + 1] = image.Pixels[i + 2] = v;
                }
            }
            offset += ph * (1 + rowBytes);
        }
        return image;
    }

    private static IEnumerable<(int Width, int Height)> Passes(int width, int height, bool interlaced)
    {
        if (!interlaced) { yield return (width, height); yield break; }
        foreach (var (x, y, dx, dy) in Adam7)
            yield return (width > x ? (width - x + dx - 1) / dx : 0, height > y ? (height - y + dy - 1) / dy : 0);
    }

    /// <summary>Undoes the PNG row filters in place (2 bytes per pixel); each row keeps its leading filter byte.</summary>
    private static void Unfilter(Span<byte> rows, int rowBytes, int rowCount, string sourceName)
    {
        const int bpp = 2;
        for (int r = 0; r < rowCount; r++)
        {
            var line = rows.Slice(r * (1 + rowBytes), 1 + rowBytes);
            var cur = line[1..];
            var prev = r > 0 ? rows.Slice((r - 1) * (1 + rowBytes) + 1, rowBytes) : default;
            switch (line[0])
            {
                case 0: break;
                case 1: for (int i = bpp; i < rowBytes; i++) cur[i] += cur[i - bpp]; break;
                case 2: if (r > 0) for (int i = 0; i < rowBytes; i++) cur[i] += prev[i]; break;
                case 3:
                    for (int i = 0; i < rowBytes; i++)
                        cur[i] += (byte)(((i >= bpp ? cur[i - bpp] : 0) + (r > 0 ? prev[i] : 0)) >> 1);
                    break;
                case 4:
                    for (int i = 0; i < rowBytes; i++)
                        cur[i] += Paeth(i >= bpp ? cur[i - bpp] : (byte)0, r > 0 ? prev[i] : (byte)0, i >= bpp && r > 0 ? prev[i - bpp] : (byte)0);
                    break;
                default: throw new ImageException($"{sourceName}: PNG row {r} has an invalid filter type {line[0]} (the file is corrupt).");
            }
        }
    }

    private static byte Paeth(byte a, byte b, byte c)
    {
        int p = a + b - c, pa = Math.Abs(p - a), pb = Math.Abs(p - b), pc = Math.Abs(p - c);
        return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
    }
}
