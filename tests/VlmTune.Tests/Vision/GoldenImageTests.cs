using TorchSharp;
using VlmTune.Tests.Support;
using VlmTune.Vision;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace VlmTune.Tests.Vision;

/// <summary>The whole pipeline against the official InternVL preprocessing (PIL + torchvision), see GOLDEN.md.</summary>
public class GoldenImageTests(ITestOutputHelper output)
{
    public static TheoryData<string> ImageNames => ["wide", "tall", "tie", "tiny", "photo", "clot", "ivl1"];

    private static string PathOf(string name) =>
        Path.Combine(Fixtures.TinyDir, Fixtures.Golden.GetProperty("images").GetProperty(name).GetProperty("file").GetString()!);

    [FixtureFact]
    public void TileCountsMatchWithoutDecoding()
    {
        foreach (var image in Fixtures.Golden.GetProperty("images").EnumerateObject())
        {
            var g = image.Value;
            var info = ImageDecoder.ReadInfo(PathOf(image.Name));
            Assert.Equal(g.GetProperty("width").GetInt32(), info.Width);
            Assert.Equal(g.GetProperty("height").GetInt32(), info.Height);
            Assert.Equal(g.GetProperty("tiles").GetInt32(), DynamicPreprocess.CountTiles(info.Width, info.Height, 1, 12));
            Assert.Equal(g.GetProperty("tiles_max6").GetInt32(), DynamicPreprocess.CountTiles(info.Width, info.Height, 1, 6));
        }
    }

    [FixtureTheory]
    [MemberData(nameof(ImageNames))]
    public void PixelValuesMatchTheOfficialPreprocessing(string name)
    {
        string path = PathOf(name);
        bool png = path.EndsWith(".png", StringComparison.OrdinalIgnoreCase);
        using var scope = torch.NewDisposeScope();
        using var processed = new ImageProcessor().Process(path);
        var pv = processed.PixelValues;
        Assert.Equal(Fixtures.Golden.GetProperty("images").GetProperty(name).GetProperty("tiles").GetInt32(), processed.TileCount);
        Assert.Equal(new long[] { processed.TileCount, 3, 448, 448 }, pv.shape);

        var expectedSub = Fixtures.GoldenTensors.Read($"pixel_sub7.{name}");
        Assert.True(expectedSub.std().item<float>() > 0.1f, "golden pixels should not be flat"); // the comparison means something
        var sub = pv[.., .., TensorIndex.Slice(null, null, 7), TensorIndex.Slice(null, null, 7)];
        var (subMax, subMean) = Diff(sub, expectedSub);
        var (meanMax, _) = Diff(pv.mean([2, 3]), Fixtures.GoldenTensors.Read($"pixel_mean.{name}"));
        output.WriteLine($"{name}: pixel_sub7 max abs {subMax:E3}, mean abs {subMean:E3}; per-tile channel means max abs {meanMax:E3}");

        if (png)
        {
            Assert.True(subMax <= 1e-5, $"{name}: max abs diff {subMax} > 1e-5");
            Assert.True(meanMax <= 1e-5, $"{name}: channel-mean max abs diff {meanMax} > 1e-5");
        }
        else
        {
            Assert.True(subMean <= 0.01, $"{name}: mean abs diff {subMean} > 0.01");
            Assert.True(subMax <= 0.1, $"{name}: max abs diff {subMax} > 0.1");
        }
    }

    [FixtureFact]
    public void FullPixelValuesOfTheRealPhoto()
    {
        using var scope = torch.NewDisposeScope();
        using var processed = new ImageProcessor().Process(PathOf("clot"));
        var (max, mean) = Diff(processed.PixelValues, Fixtures.GoldenTensors.Read("pixel_values.clot"));
        output.WriteLine($"clot full: max abs {max:E3}, mean abs {mean:E3}");
        Assert.True(mean <= 0.01 && max <= 0.1, $"clot: mean abs {mean}, max abs {max}");
    }

    private static (double Max, double Mean) Diff(Tensor actual, Tensor expected)
    {
        Assert.Equal(expected.shape, actual.shape);
        var d = (actual.to(ScalarType.Float64) - expected.to(ScalarType.Float64)).abs();
        return (d.max().item<double>(), d.mean().item<double>());
    }
}
