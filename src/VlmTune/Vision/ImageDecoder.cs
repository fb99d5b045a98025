using System.Runtime.InteropServices;
using SkiaSharp;

namespace VlmTune.Vision;

/// <summary>Size and format of an encoded image, read from its header.</summary>
public sealed record ImageInfo(int Width, int Height, string Format);

/// <summary>
/// Decodes JPEG/PNG/WebP/BMP/GIF (first frame) into <see cref="RgbImage"/> with the semantics of PIL's
/// <c>Image.open(path).convert('RGB')</c>, which is what the official InternVL code feeds to its transform:
/// alpha is dropped, not composited (so pixels are decoded unpremultiplied); grey is replicated; palettes are expanded;
/// ICC profiles are ignored (no colour management); EXIF orientation is not applied.
/// The size is checked against <see cref="ImageLimits"/> from the header before any pixel is decoded.
/// </summary>
public static class ImageDecoder
{
    public static RgbImage Decode(string path, ImageLimits? limits = null)
    {
        byte[] data = ReadFile(path);
        return Decode(data, path, limits);
    }

    public static RgbImage Decode(byte[] data, string sourceName, ImageLimits? limits = null) =>
        Decode((ReadOnlySpan<byte>)data, sourceName, limits);

    public static RgbImage Decode(ReadOnlySpan<byte> data, string sourceName, ImageLimits? limits = null)
    {
        using var codec = OpenCodec(data, sourceName);
        var size = codec.Info;
        (limits ?? ImageLimits.Default).Check(size.Width, size.Height, sourceName);
        if ((long)size.Width * size.Height * 4 > Array.MaxLength)
            throw new ImageException($"{sourceName}: image is {size.Width}x{size.Height}, too large to decode in memory.");

        if (codec.EncodedFormat == SKEncodedImageFormat.Png && PngGrey16.Matches(data))
            return PngGrey16.Decode(data, sourceName);

        // No colour space on the target: Skia then converts no colours, as PIL ignores ICC profiles.
        var target = new SKImageInfo(size.Width, size.Height, SKColorType.Rgba8888, SKAlphaType.Unpremul);
        // Zeroed, and Skia told so: pixels a decoder does not write (e.g. canvas outside a GIF's first frame) must read
        // as transparent for the GIF fix-up below.
        var rgba = new byte[size.Width * size.Height * 4];
        SKCodecResult result;
        unsafe
        {
            fixed (byte* p = rgba)
                result = codec.GetPixels(target, (IntPtr)p, new SKCodecOptions(SKZeroInitialized.Yes));
        }
        if (result != SKCodecResult.Success)
            throw new ImageException($"{sourceName}: cannot decode {FormatName(codec.EncodedFormat)} image ({size.Width}x{size.Height}): {Describe(result)}.");

        if (codec.EncodedFormat == SKEncodedImageFormat.Gif)
            GifTransparency.RestorePaletteColours(data, rgba);
        return new RgbImage(size.Width, size.Height, DropAlpha(rgba));
    }

    /// <summary>Width, height and format from the header only; nothing is decoded.</summary>
    public static ImageInfo ReadInfo(string path)
    {
        // A header fits in far less than the whole file, but formats differ in where it ends (JPEG's SOF can follow
        // large EXIF/ICC segments), so let Skia read from the file stream and stop where it needs.
        if (!File.Exists(path)) throw new ImageException($"{path}: image file not found.");
        try
        {
            using var stream = File.OpenRead(path);
            using var codec = SKCodec.Create(stream, out var result)
                ?? throw new ImageException($"{path}: not a readable image ({Describe(result)}); supported formats are JPEG, PNG, WebP, BMP and GIF.");
            return new ImageInfo(codec.Info.Width, codec.Info.Height, FormatName(codec.EncodedFormat));
        }
        catch (IOException e) { throw new ImageException($"{path}: cannot read image file: {e.Message}", e); }
        catch (UnauthorizedAccessException e) { throw new ImageException($"{path}: cannot read image file: {e.Message}", e); }
    }

    public static ImageInfo ReadInfo(ReadOnlySpan<byte> data, string sourceName)
    {
        using var codec = OpenCodec(data, sourceName);
        return new ImageInfo(codec.Info.Width, codec.Info.Height, FormatName(codec.EncodedFormat));
    }

    public static ImageInfo ReadInfo(byte[] data, string sourceName) => ReadInfo((ReadOnlySpan<byte>)data, sourceName);

    private static SKCodec OpenCodec(ReadOnlySpan<byte> data, string sourceName)
    {
        if (data.IsEmpty) throw new ImageException($"{sourceName}: image file is empty.");
        // SKData copies the bytes, so the codec never points into managed memory that may move.
        using var skData = SKData.CreateCopy(data);
        var codec = SKCodec.Create(new SKMemoryStream(skData), out var result); // the codec owns the stream

        if (codec is null)
            throw new ImageException($"{sourceName}: not a readable image ({Describe(result)}); supported formats are JPEG, PNG, WebP, BMP and GIF.");
        return codec;
    }

    private static byte[] ReadFile(string path)
    {
        if (!File.Exists(path)) throw new ImageException($"{path}: image file not found.");
        try { return File.ReadAllBytes(path); }
        catch (IOException e) { throw new ImageException($"{path}: cannot read image file: {e.Message}", e); }
        catch (UnauthorizedAccessException e) { throw new ImageException($"{path}: cannot read image file: {e.Message}", e); }
    }

    /// <summary>RGBA → RGB by discarding alpha, as PIL's RGBA→RGB conversion does.</summary>
    private static byte[] DropAlpha(byte[] rgba)
    {
        int n = rgba.Length / 4;
        var rgb = GC.AllocateUninitializedArray<byte>(n * 3);
        for (int i = 0, s = 0, d = 0; i < n; i++, s += 4, d += 3)
        {
            rgb[d] = rgba[s];
            rgb[d + 1] = rgba[s + 1];
            rgb[d + 2] = rgba[s + 2];
        }
        return rgb;
    }

    internal static string FormatName(SKEncodedImageFormat format) => format switch
    {
        SKEncodedImageFormat.Jpeg => "JPEG",
        SKEncodedImageFormat.Png => "PNG",
        SKEncodedImageFormat.Webp => "WEBP",
        SKEncodedImageFormat.Bmp => "BMP",
        SKEncodedImageFormat.Gif => "GIF",
        _ => format.ToString().ToUpperInvariant(),
    };

    private static string Describe(SKCodecResult result) => result switch
    {
        SKCodecResult.IncompleteInput => "the file is truncated",
        SKCodecResult.ErrorInInput => "the file is corrupt",
        SKCodecResult.Unimplemented => "unsupported format or feature",
        SKCodecResult.InvalidInput => "the data is invalid",
        SKCodecResult.InvalidConversion => "unsupported pixel format",
        SKCodecResult.InvalidScale => "invalid scale",
        SKCodecResult.InvalidParameters => "invalid parameters",
        SKCodecResult.CouldNotRewind => "the data could not be re-read",
        SKCodecResult.InternalError => "internal decoder error",
        _ => result.ToString(),
    };
}
