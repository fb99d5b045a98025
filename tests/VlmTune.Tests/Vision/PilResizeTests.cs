using VlmTune.Vision;

namespace VlmTune.Tests.Vision;

/// <summary>
/// Expected values are those asserted by Pillow's own test-suite (Tests/test_image_resample.py) for BICUBIC, so they
/// pin our resampler to Pillow's integer arithmetic without needing Pillow here. The golden tests cover real images.
/// </summary>
public class PilResizeTests
{
    /// <summary>Pillow's accuracy case: two bright (0xE1) and two dark (0x1E) squares.</summary>
    private static RgbImage Quadrants(int size, byte colour = 0xE1)
    {
        var image = new RgbImage(size, size);
        int h = size / 2;
        for (int y = 0; y < size; y++)
            for (int x = 0; x < size; x++)
            {
                bool bright = (x < h && y < h) || (x >= h && y >= h);
                byte v = bright ? colour : (byte)(255 - colour);
                int i = (y * size + x) * 3;
                image.Pixels[i] = image.Pixels[i + 1] = image.Pixels[i + 2] = v;
            }
        return image;
    }

    /// <summary>The full expected channel from its top-left quarter, mirrored as Pillow's make_sample does.</summary>
    private static byte[,] Sample(string quarterHex, int size)
    {
        var values = quarterHex.Split(' ', StringSplitOptions.RemoveEmptyEntries).Select(v => Convert.ToByte(v, 16)).ToArray();
        int w = size / 2;
        var s = new byte[size, size];
        for (int y = 0; y < w; y++)
            for (int x = 0; x < w; x++)
            {
                byte v = values[y * w + x];
                s[x, y] = v;
                s[size - x - 1, size - y - 1] = v;
                s[x, size - y - 1] = (byte)(255 - v);
                s[size - x - 1, y] = (byte)(255 - v);
            }
        return s;
    }

    private static void AssertChannelsEqual(byte[,] expected, RgbImage actual)
    {
        for (int y = 0; y < actual.Height; y++)
            for (int x = 0; x < actual.Width; x++)
            {
                var (r, g, b) = actual[x, y];
                Assert.True(r == expected[x, y] && g == expected[x, y] && b == expected[x, y],
                    $"pixel ({x},{y}): expected {expected[x, y]:x2}, got {r:x2} {g:x2} {b:x2}");
            }
    }

    [Fact]
    public void ReduceBicubicMatchesPillow()
    {
        var resized = PilResize.Resize(Quadrants(12), 6, 6);
        AssertChannelsEqual(Sample("e1 e3 d4 e3 e5 d6 d4 d6 c9", 6), resized);
    }

    [Fact]
    public void EnlargeBicubicMatchesPillow()
    {
        var resized = PilResize.Resize(Quadrants(4), 8, 8);
        AssertChannelsEqual(Sample("e1 e5 ee b9 e5 e9 f3 bc ee f3 fd c1 b9 bc c1 a2", 8), resized);
    }

    [Fact]
    public void CoefficientsOfAHugeReductionStayPrecise()
    {
        // Pillow's TestCoreResampleCoefficients.test_reduce: a 254/0 step, 400000 px wide, reduced to 5 px: the middle
        // pixel must be exactly 127.
        for (int width = 400000; width < 400010; width += 2)
        {
            var image = new RgbImage(width, 1);
            for (int x = 0; x < width / 2; x++) image.Pixels[3 * x] = image.Pixels[3 * x + 1] = image.Pixels[3 * x + 2] = 254;
            var resized = PilResize.Resize(image, 5, 1);
            Assert.Equal((127, 127, 127), ((int)resized[2, 0].R, (int)resized[2, 0].G, (int)resized[2, 0].B));
        }
    }

    [Theory]
    [InlineData(1280, 1280, 256, 256)] // Pillow's test_nonzero_coefficients
    [InlineData(60, 45, 1792, 1344)]   // strong upscale
    [InlineData(640, 480, 448, 448)]   // both axes shrink
    [InlineData(300, 900, 300, 448)]   // vertical pass only
    [InlineData(300, 900, 448, 900)]   // horizontal pass only
    public void FlatImagesStayFlat(int width, int height, int outWidth, int outHeight)
    {
        var image = new RgbImage(width, height);
        for (int i = 0; i < image.Pixels.Length; i += 3) { image.Pixels[i] = 0x20; image.Pixels[i + 1] = 0x40; image.Pixels[i + 2] = 0x60; }
        var resized = PilResize.Resize(image, outWidth, outHeight);
        Assert.Equal((outWidth, outHeight), (resized.Width, resized.Height));
        for (int i = 0; i < resized.Pixels.Length; i += 3)
            Assert.True(resized.Pixels[i] == 0x20 && resized.Pixels[i + 1] == 0x40 && resized.Pixels[i + 2] == 0x60, $"byte {i}");
    }

    [Fact]
    public void OvershootIsClippedToTheByteRange()
    {
        // Bicubic rings past a hard edge; Pillow clips the result to 0..255 rather than wrapping.
        var image = new RgbImage(8, 1);
        for (int x = 4; x < 8; x++) image.Pixels[3 * x] = image.Pixels[3 * x + 1] = image.Pixels[3 * x + 2] = 255;
        var resized = PilResize.Resize(image, 32, 1);
        Assert.Contains(resized.Pixels, b => b == 0);
        Assert.Contains(resized.Pixels, b => b == 255);
        Assert.True(resized.Pixels.Take(3 * 12).All(b => b == 0), "left of the edge stays black (no wrap-around of negative sums)");
    }

    [Fact]
    public void SameSizeIsAnIndependentCopy()
    {
        var image = Quadrants(6);
        var copy = PilResize.Resize(image, 6, 6);
        Assert.Equal(image.Pixels, copy.Pixels);
        Assert.NotSame(image.Pixels, copy.Pixels);
    }

    [Fact]
    public void CropCopiesTheBoxAndRejectsBoxesOutside()
    {
        var image = new RgbImage(4, 3);
        for (int i = 0; i < image.Pixels.Length; i++) image.Pixels[i] = (byte)i;
        var crop = image.Crop(1, 1, 2, 2);
        Assert.Equal(new byte[] { 15, 16, 17, 18, 19, 20, 27, 28, 29, 30, 31, 32 }, crop.Pixels);
        Assert.Throws<ArgumentOutOfRangeException>(() => image.Crop(3, 0, 2, 1));
    }
}
