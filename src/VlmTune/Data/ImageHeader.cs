using System.Buffers.Binary;
using SkiaSharp;

namespace VlmTune.Data;

/// <summary>
/// Reads an image's pixel size from its header only (JPEG SOF, PNG IHDR, GIF, BMP, WebP), without decoding pixels:
/// converting tens of thousands of images must cost one small read each. Other formats fall back to SkiaSharp's
/// codec, which also stops at the header. Sizes are as stored (no EXIF rotation), like PIL's <c>Image.size</c>.
/// </summary>
public static class ImageHeader
{
    /// <summary>Returns (width, height), or null when the file is not a recognisable image.</summary>
    public static (int Width, int Height)? TryReadSize(string path)
    {
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 4096);
        return TryReadSize(stream);
    }

    public static (int Width, int Height)? TryReadSize(Stream stream)
    {
        Span<byte> head = stackalloc byte[32];
        var n = ReadAtMost(stream, head);
        head = head[..n];
        if (n >= 4 && head[0] == 0xFF && head[1] == 0xD8) return ReadJpeg(stream, 2);
        if (n >= 24 && head[..8].SequenceEqual("\x89PNG\r\n\x1a\n"u8)) // IHDR is always the first chunk
            return Positive(BinaryPrimitives.ReadInt32BigEndian(head[16..]), BinaryPrimitives.ReadInt32BigEndian(head[20..]));
        if (n >= 10 && (head[..6].SequenceEqual("GIF87a"u8) || head[..6].SequenceEqual("GIF89a"u8)))
            return Positive(BinaryPrimitives.ReadUInt16LittleEndian(head[6..]), BinaryPrimitives.ReadUInt16LittleEndian(head[8..]));
        if (n >= 26 && head[0] == 'B' && head[1] == 'M')
            return Positive(BinaryPrimitives.ReadInt32LittleEndian(head[18..]), Math.Abs(BinaryPrimitives.ReadInt32LittleEndian(head[22..])));
        if (n >= 30 && head[..4].SequenceEqual("RIFF"u8) && head[8..12].SequenceEqual("WEBP"u8)) return ReadWebP(head);
        stream.Position = 0;
        return ReadWithSkia(stream);
    }

    private static (int, int)? ReadJpeg(Stream stream, long offset)
    {
        // Walk the marker segments until a start-of-frame (SOF0..SOF15 except DHT/JPG/DAC) gives the size.
        stream.Position = offset;
        Span<byte> seg = stackalloc byte[9];
        while (true)
        {
            int b;
            do b = stream.ReadByte(); while (b == 0xFF); // fill bytes before a marker
            if (b < 0) return null;
            var marker = b;
            if (marker == 0xD8 || marker is >= 0xD0 and <= 0xD7 || marker == 0x01) continue; // markers without length
            if (marker == 0xD9 || marker == 0xDA) return null; // end of image / start of scan before any frame header
            if (ReadAtMost(stream, seg[..2]) < 2) return null;
            var length = BinaryPrimitives.ReadUInt16BigEndian(seg);
            if (length < 2) return null;
            var isSof = marker is >= 0xC0 and <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
            if (isSof)
            {
                if (ReadAtMost(stream, seg[..5]) < 5) return null; // precision, height, width
                return Positive(BinaryPrimitives.ReadUInt16BigEndian(seg[3..]), BinaryPrimitives.ReadUInt16BigEndian(seg[1..]));
            }
            stream.Seek(length - 2, SeekOrigin.Current);
            // Expect the next marker's 0xFF; anything else means a corrupt stream.
            var next = stream.ReadByte();
            if (next != 0xFF) return null;
        }
    }

    private static (int, int)? ReadWebP(ReadOnlySpan<byte> head)
    {
        var chunk = head[12..16];
        if (chunk.SequenceEqual("VP8 "u8)) // lossy: 14-bit sizes after the 3-byte frame tag and start code
            return Positive(BinaryPrimitives.ReadUInt16LittleEndian(head[26..]) & 0x3FFF, BinaryPrimitives.ReadUInt16LittleEndian(head[28..]) & 0x3FFF);
        if (chunk.SequenceEqual("VP8L"u8)) // lossless: 14-bit (size - 1) fields packed after the signature byte
        {
            var bits = BinaryPrimitives.ReadUInt32LittleEndian(head[21..]);
            return Positive((int)(bits & 0x3FFF) + 1, (int)((bits >> 14) & 0x3FFF) + 1);
        }
        if (chunk.SequenceEqual("VP8X"u8)) // extended: 24-bit (size - 1) canvas fields
            return Positive((head[24] | head[25] << 8 | head[26] << 16) + 1, (head[27] | head[28] << 8 | head[29] << 16) + 1);
        return null;
    }

    private static (int, int)? ReadWithSkia(Stream stream)
    {
        using var codec = SKCodec.Create(stream);
        return codec is null ? null : Positive(codec.Info.Width, codec.Info.Height);
    }

    private static (int, int)? Positive(int width, int height) => width > 0 && height > 0 ? (width, height) : null;

    private static int ReadAtMost(Stream stream, Span<byte> buffer)
    {
        var total = 0;
        while (total < buffer.Length)
        {
            var n = stream.Read(buffer[total..]);
            if (n == 0) break;
            total += n;
        }
        return total;
    }
}
