using TorchSharp;
using VlmTune.Vision;
using static TorchSharp.torch;

namespace VlmTune.Tests.Vision;

public class ImageProcessorTests
{
    private static byte[] NoisePng(int width, int height, int seed)
    {
        var rgb = new byte[width * height * 3];
        new Random(seed).NextBytes(rgb);
        return TestImages.Png(width, height, 2, rgb);
    }

    [Fact]
    public void NormalisesLikeTorchvisionInFloat32()
    {
        // ToTensor then Normalize: (x / 255 − mean) / std, every step rounded to float32.
        var image = new RgbImage(448, 448);
        image.Pixels[0] = 0; image.Pixels[1] = 128; image.Pixels[2] = 255;
        using var t = ImageTransform.ToTensor([image]);
        Assert.Equal(new long[] { 1, 3, 448, 448 }, t.shape);
        Assert.Equal((0f / 255f - 0.485f) / 0.229f, t[0, 0, 0, 0].item<float>());
        Assert.Equal((128f / 255f - 0.456f) / 0.224f, t[0, 1, 0, 0].item<float>());
        Assert.Equal((255f / 255f - 0.406f) / 0.225f, t[0, 2, 0, 0].item<float>());
        // Same arithmetic in torch itself.
        using var expected = (torch.tensor(new float[] { 0, 128, 255 }) / 255 - torch.tensor(new[] { 0.485f, 0.456f, 0.406f })) / torch.tensor(new[] { 0.229f, 0.224f, 0.225f });
        Assert.Equal(expected.data<float>().ToArray(), new[] { t[0, 0, 0, 0].item<float>(), t[0, 1, 0, 0].item<float>(), t[0, 2, 0, 0].item<float>() });
    }

    [Fact]
    public void ProcessEqualsTilingThenTransform()
    {
        var png = NoisePng(520, 300, 3);
        using var scope = torch.NewDisposeScope();
        using var processed = new ImageProcessor().Process(png, "noise.png");
        var tiles = DynamicPreprocess.Apply(ImageDecoder.Decode(png, "noise.png"));
        var expected = ImageTransform.ToTensor(tiles);
        Assert.Equal(tiles.Count, processed.TileCount);
        Assert.Equal(DynamicPreprocess.CountTiles(520, 300), processed.TileCount);
        Assert.Equal((520, 300), (processed.OriginalWidth, processed.OriginalHeight));
        Assert.Equal(ScalarType.Float32, processed.PixelValues.dtype);
        Assert.True(processed.PixelValues.eq(expected).all().item<bool>());
    }

    [Fact]
    public void OptionsControlTilingAndLimits()
    {
        var png = NoisePng(900, 300, 4);
        using (var six = new ImageProcessor(new ImageProcessorOptions { MaxTiles = 6 }).Process(png, "wide.png"))
        {
            Assert.Equal(new TileGrid(3, 1, true), six.Grid);
            Assert.Equal(new long[] { 4, 3, 448, 448 }, six.PixelValues.shape);
        }
        using (var noThumb = new ImageProcessor(new ImageProcessorOptions { UseThumbnail = false }).Process(png, "wide.png"))
            Assert.Equal(3, noThumb.TileCount);
        using (var small = new ImageProcessor(new ImageProcessorOptions { ImageSize = 224, MaxTiles = 2 }).Process(png, "wide.png"))
            Assert.Equal(new long[] { 3, 3, 224, 224 }, small.PixelValues.shape);

        var limited = new ImageProcessor(new ImageProcessorOptions { Limits = new ImageLimits { MaxPixels = 1000 } });
        Assert.Contains("wide.png", Assert.Throws<ImageException>(() => limited.Process(png, "wide.png")).Message);
    }

    [Fact]
    public void InvalidOptionsAreReportedTogether()
    {
        var e = Assert.Throws<VlmTuneException>(() => new ImageProcessor(new ImageProcessorOptions { ImageSize = 0, MinTiles = 3, MaxTiles = 2 }));
        Assert.Contains("ImageSize", e.Message);
        Assert.Contains("MaxTiles (2)", e.Message);
    }
}
