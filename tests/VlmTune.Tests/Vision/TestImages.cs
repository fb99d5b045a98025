using System.IO.Compression;
using System.Text;

namespace VlmTune.Tests.Vision;

/// <summary>Tiny hand-written encoders, so decoding tests control every byte of their input.</summary>
internal static class TestImages
{
    /// <summary>An 8-bit PNG: <paramref name="samples"/> holds rows of width × channels(colourType) bytes.</summary>
    public static byte[] Png(int width, int height, byte colourType, byte[] samples, params (string Type, byte[] Data)[] extraChunks)
    {
        int channels = colourType switch { 0 => 1, 2 => 3, 3 => 1, 4 => 2, 6 => 4, _ => throw new ArgumentException("colour type") };
        var raw = new MemoryStream();
        for (int y = 0; y < height; y++)
        {
            raw.WriteByte(0); // filter: none
            raw.Write(samples, y * width * channels, width * channels);
        }
        var compressed = new MemoryStream();
        using (var z = new ZLibStream(compressed, CompressionLevel.Optimal, leaveOpen: true)) raw.WriteTo(z);
        return PngFile(Ihdr(width, height, colourType), extraChunks, compressed.ToArray());
    }

    /// <summary>
    /// A greyscale PNG of bit depth 8 or 16 (samples big-endian for 16) that exercises the decoder: row filter types
    /// cycle through 0..4 and, when <paramref name="interlaced"/>, pixels are stored in Adam7 passes.
    /// </summary>
    public static byte[] GreyPng(int width, int height, int bitDepth, ushort[] samples, bool interlaced)
    {
        int bpp = bitDepth / 8;
        (int X, int Y, int Dx, int Dy)[] passes = interlaced
            ? [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
            : [(0, 0, 1, 1)];
        var raw = new MemoryStream();
        int rowIndex = 0;
        foreach (var (px, py, dx, dy) in passes)
        {
            int pw = width > px ? (width - px + dx - 1) / dx : 0, ph = height > py ? (height - py + dy - 1) / dy : 0;
            if (pw == 0 || ph == 0) continue;
            byte[] prev = new byte[pw * bpp];
            for (int r = 0; r < ph; r++)
            {
                var cur = new byte[pw * bpp];
                for (int c = 0; c < pw; c++)
                {
                    ushort v = samples[(py + r * dy) * width + px + c * dx];
                    if (bpp == 2) { cur[2 * c] = (byte)(v >> 8); cur[2 * c + 1] = (byte)v; } else cur[c] = (byte)v;
                }
                byte filter = (byte)(rowIndex++ % 5);
                raw.WriteByte(filter);
                for (int i = 0; i < cur.Length; i++)
                {
                    int a = i >= bpp ? cur[i - bpp] : 0, b = r > 0 ? prev[i] : 0, cc = i >= bpp && r > 0 ? prev[i - bpp] : 0;
                    int predictor = filter switch
                    {
                        0 => 0, 1 => a, 2 => b, 3 => (a + b) >> 1,
                        _ => Math.Abs(b - cc) <= Math.Abs(a - cc) && Math.Abs(b - cc) <= Math.Abs(a + b - 2 * cc) ? a
                            : Math.Abs(a - cc) <= Math.Abs(a + b - 2 * cc) ? b : cc,
                    };
                    raw.WriteByte((byte)(cur[i] - predictor));
                }
                prev = cur;
            }
        }
        var compressed = new MemoryStream();
        using (var z = new ZLibStream(compressed, CompressionLevel.Optimal, leaveOpen: true)) raw.WriteTo(z);
        var ihdr = Ihdr(width, height, 0);
        ihdr[8] = (byte)bitDepth;
        ihdr[12] = (byte)(interlaced ? 1 : 0);
        return PngFile(ihdr, [], compressed.ToArray());
    }

    /// <summary>A PNG whose header claims width × height but whose image data is a few bytes.</summary>
    public static byte[] PngHeaderOnly(int width, int height) =>
        PngFile(Ihdr(width, height, 2), [], [0x78, 0x9C, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]);

    private static byte[] Ihdr(int width, int height, byte colourType)
    {
        var ihdr = new byte[13];
        BigEndian(ihdr, 0, width);
        BigEndian(ihdr, 4, height);
        ihdr[8] = 8; ihdr[9] = colourType; // bit depth 8, compression/filter/interlace 0
        return ihdr;
    }

    private static byte[] PngFile(byte[] ihdr, (string Type, byte[] Data)[] extraChunks, byte[] idat)
    {
        var file = new MemoryStream();
        file.Write([0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A]);
        Chunk(file, "IHDR", ihdr);
        foreach (var (type, data) in extraChunks) Chunk(file, type, data);
        Chunk(file, "IDAT", idat);
        Chunk(file, "IEND", []);
        return file.ToArray();
    }

    private static void Chunk(Stream s, string type, byte[] data)
    {
        var header = new byte[8];
        BigEndian(header, 0, data.Length);
        Encoding.ASCII.GetBytes(type, 0, 4, header, 4);
        s.Write(header);
        s.Write(data);
        var crcInput = new byte[4 + data.Length];
        Array.Copy(header, 4, crcInput, 0, 4);
        data.CopyTo(crcInput, 4);
        var crc = new byte[4];
        BigEndian(crc, 0, (int)Crc32(crcInput));
        s.Write(crc);
    }

    private static uint Crc32(byte[] data)
    {
        uint crc = 0xFFFFFFFF;
        foreach (byte b in data)
        {
            crc ^= b;
            for (int k = 0; k < 8; k++) crc = (crc & 1) != 0 ? (crc >> 1) ^ 0xEDB88320 : crc >> 1;
        }
        return ~crc;
    }

    private static void BigEndian(byte[] buffer, int offset, int value)
    {
        buffer[offset] = (byte)(value >> 24); buffer[offset + 1] = (byte)(value >> 16);
        buffer[offset + 2] = (byte)(value >> 8); buffer[offset + 3] = (byte)value;
    }

    /// <summary>
    /// A GIF89a with a 4-colour global palette, one full-canvas frame of palette <paramref name="indices"/>, and optionally
    /// a transparent index. LZW is written without compression: a clear code before every two pixels keeps codes 3 bits.
    /// </summary>
    public static byte[] Gif(int width, int height, byte[] palette12, byte[] indices, int? transparentIndex) =>
        Gif(width, height, palette12, indices, transparentIndex, (0, 0, width, height));

    /// <summary>As above, with the first frame covering only <paramref name="frame"/> (left, top, width, height) of the canvas.</summary>
    public static byte[] Gif(int width, int height, byte[] palette12, byte[] indices, int? transparentIndex, (int Left, int Top, int Width, int Height) frame)
    {
        var s = new MemoryStream();
        s.Write("GIF89a"u8);
        s.Write([(byte)width, (byte)(width >> 8), (byte)height, (byte)(height >> 8), 0x81, 0, 0]);
        s.Write(palette12);
        if (transparentIndex is { } t) s.Write([0x21, 0xF9, 4, 1, 0, 0, (byte)t, 0]);
        s.Write([0x2C, (byte)frame.Left, (byte)(frame.Left >> 8), (byte)frame.Top, (byte)(frame.Top >> 8),
                 (byte)frame.Width, (byte)(frame.Width >> 8), (byte)frame.Height, (byte)(frame.Height >> 8), 0]);
        s.WriteByte(2); // LZW minimum code size
        const int clear = 4, end = 5;
        var codes = new List<int>();
        for (int i = 0; i < indices.Length; i++)
        {
            if (i % 2 == 0) codes.Add(clear);
            codes.Add(indices[i]);
        }
        codes.Add(end);
        var bytes = new List<byte>();
        int acc = 0, bits = 0;
        foreach (int code in codes)
        {
            acc |= code << bits; bits += 3;
            while (bits >= 8) { bytes.Add((byte)acc); acc >>= 8; bits -= 8; }
        }
        if (bits > 0) bytes.Add((byte)acc);
        for (int i = 0; i < bytes.Count; i += 255)
        {
            int n = Math.Min(255, bytes.Count - i);
            s.WriteByte((byte)n);
            s.Write(bytes.GetRange(i, n).ToArray());
        }
        s.WriteByte(0);
        s.WriteByte(0x3B);
        return s.ToArray();
    }

    /// <summary>A 24-bit bottom-up BMP of the given interleaved RGB pixels.</summary>
    public static byte[] Bmp(int width, int height, byte[] rgb)
    {
        int rowBytes = (width * 3 + 3) & ~3;
        var s = new MemoryStream();
        var w = new BinaryWriter(s);
        w.Write((byte)'B'); w.Write((byte)'M'); w.Write(54 + rowBytes * height); w.Write(0); w.Write(54);
        w.Write(40); w.Write(width); w.Write(height); w.Write((short)1); w.Write((short)24); w.Write(0); w.Write(rowBytes * height);
        w.Write(2835); w.Write(2835); w.Write(0); w.Write(0);
        for (int y = height - 1; y >= 0; y--)
        {
            for (int x = 0; x < width; x++)
            {
                int i = (y * width + x) * 3;
                w.Write(rgb[i + 2]); w.Write(rgb[i + 1]); w.Write(rgb[i]);
            }
            for (int p = width * 3; p < rowBytes; p++) w.Write((byte)0);
        }
        return s.ToArray();
    }

    /// <summary>An EXIF APP1 segment carrying only Orientation = <paramref name="orientation"/>, inserted after SOI.</summary>
    public static byte[] WithExifOrientation(byte[] jpeg, int orientation)
    {
        byte[] tiff = [(byte)'M', (byte)'M', 0, 42, 0, 0, 0, 8, 0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, (byte)orientation, 0, 0, 0, 0, 0, 0];
        var payload = "Exif\0\0"u8.ToArray().Concat(tiff).ToArray();
        int length = payload.Length + 2;
        byte[] segment = [0xFF, 0xE1, (byte)(length >> 8), (byte)length, .. payload];
        return [.. jpeg.AsSpan(0, 2), .. segment, .. jpeg.AsSpan(2)];
    }
}
