using System.Runtime.InteropServices;
using SkiaSharp;
using VlmTune.Vision;

namespace VlmTune.Tests.Vision;

/// <summary>Decoding gives what PIL's <c>Image.open(...).convert('RGB')</c> gives.</summary>
public class ImageDecoderTests
{
    private static readonly byte[] Palette = [250, 0, 0, 0, 200, 0, 0, 0, 150, 17, 34, 51];

    [Fact]
    public void RgbaPngDropsAlphaWithoutPremultiplying()
    {
        // 4x1: opaque, half, nearly and fully transparent — PIL keeps the stored colour whatever the alpha.
        byte[] rgba = [200, 100, 50, 255, 200, 100, 50, 128, 200, 100, 50, 1, 200, 100, 50, 0];
        var image = ImageDecoder.Decode(TestImages.Png(4, 1, 6, rgba), "rgba.png");
        Assert.Equal((4, 1), (image.Width, image.Height));
        Assert.Equal(new byte[] { 200, 100, 50, 200, 100, 50, 200, 100, 50, 200, 100, 50 }, image.Pixels);
    }

    [Fact]
    public void GreyAndGreyAlphaPngsReplicateTheGreyLevel()
    {
        var grey = ImageDecoder.Decode(TestImages.Png(3, 1, 0, [0, 77, 255]), "grey.png");
        Assert.Equal(new byte[] { 0, 0, 0, 77, 77, 77, 255, 255, 255 }, grey.Pixels);
        var greyAlpha = ImageDecoder.Decode(TestImages.Png(2, 1, 4, [90, 0, 180, 60]), "la.png");
        Assert.Equal(new byte[] { 90, 90, 90, 180, 180, 180 }, greyAlpha.Pixels);
    }

    [Fact]
    public void PalettePngExpandsEveryEntryIncludingTransparentOnes()
    {
        // tRNS makes entry 1 fully transparent: PIL's P→RGB still shows its palette colour.
        var png = TestImages.Png(4, 1, 3, [0, 1, 2, 3], ("PLTE", Palette), ("tRNS", [255, 0, 255, 255]));
        var image = ImageDecoder.Decode(png, "palette.png");
        Assert.Equal(Palette, image.Pixels);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Grey16PngClipsSamplesToAByteLikePil(bool interlaced)
    {
        const int w = 13, h = 11; // odd sizes leave some Adam7 passes ragged
        var rnd = new Random(5);
        var samples = new ushort[w * h];
        for (int i = 0; i < samples.Length; i++) samples[i] = (ushort)(i % 3 == 0 ? rnd.Next(256) : rnd.Next(65536));

        // The hand-made encoder (filters 0..4, Adam7) is first checked against Skia on 8-bit data...
        var eight = samples.Select(v => (ushort)(v & 0xFF)).ToArray();
        var decoded8 = ImageDecoder.Decode(TestImages.GreyPng(w, h, 8, eight, interlaced), "grey8.png");
        Assert.Equal(eight.SelectMany(v => new[] { (byte)v, (byte)v, (byte)v }).ToArray(), decoded8.Pixels);

        // ...then 16-bit samples must come out as PIL's I;16 → RGB gives them: the value if below 256, else 255.
        var decoded16 = ImageDecoder.Decode(TestImages.GreyPng(w, h, 16, samples, interlaced), "grey16.png");
        var expected = samples.Select(v => v < 256 ? (byte)v : (byte)255).SelectMany(v => new[] { v, v, v }).ToArray();
        Assert.Equal(expected, decoded16.Pixels);
    }

    [Fact]
    public void TruncatedGrey16PngNamesTheFile()
    {
        var samples = Enumerable.Range(0, 64 * 64).Select(i => (ushort)(i * 17)).ToArray();
        var png = TestImages.GreyPng(64, 64, 16, samples, interlaced: false);
        var e = Assert.Throws<ImageException>(() => ImageDecoder.Decode(png[..(png.Length / 2)], "cut16.png"));
        Assert.Contains("cut16.png", e.Message);
    }

    [Fact]
    public void NoColourManagementIsApplied()
    {
        // gAMA = 1.0 (linear) would change every mid-tone if converted to sRGB; PIL ignores it.
        byte[] gamma = [0, 1, 0x86, 0xA0]; // 100000
        var image = ImageDecoder.Decode(TestImages.Png(2, 1, 2, [128, 64, 32, 10, 20, 30], ("gAMA", gamma)), "gamma.png");
        Assert.Equal(new byte[] { 128, 64, 32, 10, 20, 30 }, image.Pixels);
    }

    [Fact]
    public void GifFirstFrameExpandsThePaletteAndShowsTheTransparentIndexColour()
    {
        var gif = TestImages.Gif(4, 2, Palette, [0, 1, 2, 3, 3, 2, 1, 0], transparentIndex: 2);
        var image = ImageDecoder.Decode(gif, "anim.gif");
        Assert.Equal((4, 2), (image.Width, image.Height));
        byte[] expected = [.. Palette, .. Palette[9..12], .. Palette[6..9], .. Palette[3..6], .. Palette[0..3]];
        Assert.Equal(expected, image.Pixels);
        Assert.Equal("GIF", ImageDecoder.ReadInfo(gif, "anim.gif").Format);
    }

    [Theory]
    [InlineData(null, 0)] // PIL starts frame 0 from a zeroed palette image: index 0
    [InlineData(3, 3)]    // ... or from one filled with the transparent index
    public void GifCanvasOutsideTheFirstFrameShowsThePaletteColourPilFillsWith(int? transparentIndex, int fillIndex)
    {
        var gif = TestImages.Gif(4, 2, Palette, [1, 2], transparentIndex, (1, 1, 2, 1));
        var image = ImageDecoder.Decode(gif, "partial.gif");
        var fill = Palette[(fillIndex * 3)..(fillIndex * 3 + 3)];
        byte[] expected = [.. fill, .. fill, .. fill, .. fill, .. fill, .. Palette[3..6], .. Palette[6..9], .. fill];
        Assert.Equal(expected, image.Pixels);
    }

    [Fact]
    public void RgbPngWithAColourKeyKeepsTheKeyColour()
    {
        // tRNS on a truecolour PNG marks (10, 20, 30) transparent; PIL's convert('RGB') still returns (10, 20, 30).
        var png = TestImages.Png(2, 1, 2, [10, 20, 30, 40, 50, 60], ("tRNS", [0, 10, 0, 20, 0, 30]));
        Assert.Equal(new byte[] { 10, 20, 30, 40, 50, 60 }, ImageDecoder.Decode(png, "key.png").Pixels);
    }

    [Fact]
    public void BmpRowsComeOutTopFirst()
    {
        byte[] rgb = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]; // 3x2
        var image = ImageDecoder.Decode(TestImages.Bmp(3, 2, rgb), "pic.bmp");
        Assert.Equal(rgb, image.Pixels);
        Assert.Equal(new ImageInfo(3, 2, "BMP"), ImageDecoder.ReadInfo(TestImages.Bmp(3, 2, rgb), "pic.bmp"));
    }

    [Fact]
    public void LosslessWebpWithAlphaKeepsTheStoredColours()
    {
        byte[] rgba = [200, 100, 50, 255, 10, 20, 30, 128, 90, 80, 70, 3, 255, 255, 255, 64];
        var webp = Encode(2, 2, rgba, pixmap => pixmap.Encode(new SKWebpEncoderOptions(SKWebpEncoderCompression.Lossless, 100)));
        var image = ImageDecoder.Decode(webp, "pic.webp");
        Assert.Equal(new byte[] { 200, 100, 50, 10, 20, 30, 90, 80, 70, 255, 255, 255 }, image.Pixels);
        Assert.Equal(new ImageInfo(2, 2, "WEBP"), ImageDecoder.ReadInfo(webp, "pic.webp"));
    }

    [Fact]
    public void ExifOrientationIsNotApplied()
    {
        // PIL's open/convert ignores EXIF orientation (the official code never calls exif_transpose).
        byte[] rgba = new byte[8 * 4 * 4];
        for (int i = 0; i < rgba.Length; i += 4) { rgba[i] = (byte)(i % 251); rgba[i + 3] = 255; }
        var jpeg = Encode(8, 4, rgba, pixmap => pixmap.Encode(new SKJpegEncoderOptions(95, SKJpegEncoderDownsample.Downsample444, SKJpegEncoderAlphaOption.Ignore)));
        var rotated = TestImages.WithExifOrientation(jpeg, 6); // "rotate 90° clockwise to display"
        var image = ImageDecoder.Decode(rotated, "rotated.jpg");
        Assert.Equal((8, 4), (image.Width, image.Height));
        Assert.Equal(ImageDecoder.Decode(jpeg, "plain.jpg").Pixels, image.Pixels);
        Assert.Equal(new ImageInfo(8, 4, "JPEG"), ImageDecoder.ReadInfo(rotated, "rotated.jpg"));
    }

    [Fact]
    public void OversizedImageIsRejectedFromTheHeader()
    {
        var bomb = TestImages.PngHeaderOnly(30000, 30000);
        Assert.Equal(new ImageInfo(30000, 30000, "PNG"), ImageDecoder.ReadInfo(bomb, "bomb.png"));
        var e = Assert.Throws<ImageException>(() => ImageDecoder.Decode(bomb, "bomb.png"));
        Assert.Contains("bomb.png", e.Message);
        Assert.Contains("30000x30000", e.Message);
        Assert.Contains("178,956,970", e.Message);

        // A configurable limit applies the same way to ordinary images.
        var small = TestImages.Png(20, 10, 0, new byte[200]);
        var limited = new ImageLimits { MaxPixels = 199 };
        Assert.Contains("small.png", Assert.Throws<ImageException>(() => ImageDecoder.Decode(small, "small.png", limited)).Message);
        Assert.Equal(20, ImageDecoder.Decode(small, "small.png", new ImageLimits { MaxPixels = 200 }).Width);
    }

    [Fact]
    public void TruncatedCorruptAndMissingFilesNameTheFile()
    {
        var dir = Directory.CreateTempSubdirectory("vlmtune-decoder-");
        try
        {
            byte[] rgb = new byte[64 * 64 * 3];
            new Random(1).NextBytes(rgb);
            var png = TestImages.Png(64, 64, 2, rgb);
            var truncated = Path.Combine(dir.FullName, "truncated.png");
            File.WriteAllBytes(truncated, png[..(png.Length / 2)]);
            var e = Assert.Throws<ImageException>(() => ImageDecoder.Decode(truncated));
            Assert.Contains(truncated, e.Message);
            Assert.Contains("truncated", e.Message);

            var garbage = Path.Combine(dir.FullName, "garbage.jpg");
            File.WriteAllBytes(garbage, "this is not an image at all"u8.ToArray());
            Assert.Contains(garbage, Assert.Throws<ImageException>(() => ImageDecoder.Decode(garbage)).Message);
            Assert.Contains(garbage, Assert.Throws<ImageException>(() => ImageDecoder.ReadInfo(garbage)).Message);

            var empty = Path.Combine(dir.FullName, "empty.png");
            File.WriteAllBytes(empty, []);
            Assert.Contains(empty, Assert.Throws<ImageException>(() => ImageDecoder.Decode(empty)).Message);

            var missing = Path.Combine(dir.FullName, "missing.png");
            Assert.Contains(missing, Assert.Throws<ImageException>(() => ImageDecoder.Decode(missing)).Message);
            Assert.Contains(missing, Assert.Throws<ImageException>(() => ImageDecoder.ReadInfo(missing)).Message);
            Assert.IsAssignableFrom<VlmTuneException>(Assert.Throws<ImageException>(() => ImageDecoder.Decode(missing)));
        }
        finally { dir.Delete(recursive: true); }
    }

    [Fact]
    public void DecodesFromAPathLikeFromBytes()
    {
        var file = Path.Combine(Path.GetTempPath(), $"vlmtune-{Guid.NewGuid():N}.png");
        try
        {
            var png = TestImages.Png(3, 1, 0, [5, 6, 7]);
            File.WriteAllBytes(file, png);
            Assert.Equal(ImageDecoder.Decode(png, "x.png").Pixels, ImageDecoder.Decode(file).Pixels);
            Assert.Equal(new ImageInfo(3, 1, "PNG"), ImageDecoder.ReadInfo(file));
        }
        finally { File.Delete(file); }
    }

    private static byte[] Encode(int width, int height, byte[] rgba, Func<SKPixmap, SKData?> encode)
    {
        using var bitmap = new SKBitmap(new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Unpremul));
        Marshal.Copy(rgba, 0, bitmap.GetPixels(), rgba.Length);
        using var pixmap = bitmap.PeekPixels();
        using var data = encode(pixmap) ?? throw new InvalidOperationException("Skia could not encode the test image.");
        return data.ToArray();
    }
}
