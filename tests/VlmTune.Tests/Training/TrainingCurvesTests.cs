using SkiaSharp;
using VlmTune.Tests.Data;
using VlmTune.Training.Reports;

namespace VlmTune.Tests.Training;

/// <summary>
/// The curves PNG: it decodes at the size asked for, and each panel really shows its series. "Shows" is measured as
/// pixels of the series' colour inside the panel's quadrant, which axes, grid and titles never use: an empty panel
/// (the failure this guards against) has none, and the tests that leave a series out check that the measure sees it.
/// </summary>
public sealed class TrainingCurvesTests
{
    private static RunScalars Scalars(IEnumerable<string> lines, string path = "scalars.json") =>
        RunScalars.Parse(string.Join("\n", lines) + "\n", path, strict: true);

    private static IEnumerable<string> TrainLines(int count = 10, double? gradNorm = 1.0) =>
        Enumerable.Range(1, count).Select(i => FakeRuns.ScalarsLine(i * 4, gradNorm: gradNorm));

    /// <summary>Pixels of each panel's quadrant within a small distance of <paramref name="color"/> (anti-aliasing blends the edges).</summary>
    private static int[] ColourCounts(SKBitmap bitmap, (byte R, byte G, byte B) color)
    {
        var counts = new int[TrainingCurves.Panels.Count];
        for (int panel = 0; panel < counts.Length; panel++)
        {
            var (left, top, right, bottom) = TrainingCurves.PanelBounds(panel, bitmap.Width, bitmap.Height);
            for (int y = top; y < bottom; y++)
                for (int x = left; x < right; x++)
                {
                    var p = bitmap.GetPixel(x, y);
                    if (Math.Abs(p.Red - color.R) + Math.Abs(p.Green - color.G) + Math.Abs(p.Blue - color.B) <= 30) counts[panel]++;
                }
        }
        return counts;
    }

    private static SKBitmap Decode(byte[] png) => SKBitmap.Decode(png) ?? throw new InvalidOperationException("the PNG does not decode");

    [Fact]
    public void PngDecodesAtItsSizeWithEverySeriesDrawnInItsPanel()
    {
        using var dir = new TempDir();
        string path = dir["curves.png"];
        var image = TrainingCurves.Write(path, [new CurveRun("work/run", Scalars(TrainLines()))], 900, 600);

        Assert.Empty(image.Missing);
        using var bitmap = Decode(File.ReadAllBytes(path));
        Assert.Equal((900, 600), (bitmap.Width, bitmap.Height));
        Assert.Equal(image.Png, File.ReadAllBytes(path));
        var counts = ColourCounts(bitmap, TrainingCurves.RunColor(0));
        Assert.All(counts, n => Assert.True(n > 150, $"a panel has only {n} pixels of its curve: [{string.Join(", ", counts)}]"));
        Assert.Equal(["curves.png"], Directory.GetFileSystemEntries(dir.Path).Select(Path.GetFileName));   // no temporary left
    }

    [Fact]
    public void AMissingSeriesIsReportedAndLeavesOnlyItsPanelEmpty()
    {
        var image = TrainingCurves.Render([new CurveRun("work/run", Scalars(TrainLines(gradNorm: null)))]);

        Assert.Equal(["work/run: no grad_norm values"], image.Missing);
        using var bitmap = Decode(image.Png);
        Assert.Equal((TrainingCurves.DefaultWidth, TrainingCurves.DefaultHeight), (bitmap.Width, bitmap.Height));
        var counts = ColourCounts(bitmap, TrainingCurves.RunColor(0));
        int gradNorm = TrainingCurves.Panels.Select(p => p.Key).ToList().IndexOf("grad_norm");
        Assert.True(counts[gradNorm] < 10, $"the grad norm panel has {counts[gradNorm]} pixels of a curve it does not have");
        Assert.All(counts.Where((_, i) => i != gradNorm), n => Assert.True(n > 150, $"[{string.Join(", ", counts)}]"));
    }

    [Fact]
    public void EvalLossIsDrawnInTheLossPanelOnly()
    {
        var lines = TrainLines().ToList();
        lines.Insert(5, FakeRuns.EvalLine(20, 2.2));
        lines.Add(FakeRuns.EvalLine(40, 1.4));
        var withEval = Scalars(lines);
        Assert.Equal([new EvalPoint(20, 2.2), new EvalPoint(40, 1.4)], withEval.Eval);
        Assert.Equal(10, withEval.Train.Count);

        using var bitmap = Decode(TrainingCurves.Render([new CurveRun("run", withEval)]).Png);
        var eval = ColourCounts(bitmap, TrainingCurves.RunColor(1));
        Assert.True(eval[0] > 40, $"the eval loss has {eval[0]} pixels in the loss panel");
        Assert.All(eval.Skip(1), n => Assert.True(n < 10, $"[{string.Join(", ", eval)}]"));

        using var without = Decode(TrainingCurves.Render([new CurveRun("run", Scalars(TrainLines()))]).Png);
        Assert.True(ColourCounts(without, TrainingCurves.RunColor(1))[0] < 10);
    }

    [Fact]
    public void SeveralRunsAreDrawnTogetherEachInItsColour()
    {
        var a = Scalars(TrainLines(10));
        // The second as a resumed run would be: the iterations after the first's, so neither hides the other.
        var b = Scalars(Enumerable.Range(11, 10).Select(i => FakeRuns.ScalarsLine(i * 4, total: 80)));
        using var bitmap = Decode(TrainingCurves.Render([new CurveRun("a/1", a), new CurveRun("b/1", b)]).Png);
        foreach (int run in new[] { 0, 1 })
        {
            var counts = ColourCounts(bitmap, TrainingCurves.RunColor(run));
            Assert.All(counts, n => Assert.True(n > 60, $"run {run}: [{string.Join(", ", counts)}]"));
        }
    }

    [Fact]
    public void ScalarsLinesAreReadAsTheTrainerWritesThem()
    {
        var s = Scalars([FakeRuns.ScalarsLine(4), FakeRuns.ScalarsLine(8).Replace("\"loss\":", "\"loss\":null,\"x\":"), "", FakeRuns.EvalLine(8, 1.5)]);
        Assert.Equal([4L, 8L], s.Train.Select(p => p.Iter));
        Assert.NotNull(s.Train[0].Loss);
        Assert.Null(s.Train[1].Loss);            // a skipped window: no point on the loss curve, the others stay
        Assert.NotNull(s.Train[1].Lr);
        Assert.Equal(4, s.Lines);
        Assert.False(s.PartialLastLine);

        // A line still being written (no newline yet) is left out and flagged, not an error.
        var partial = RunScalars.Parse(FakeRuns.ScalarsLine(4) + "\n" + FakeRuns.ScalarsLine(8)[..20], "scalars.json", strict: true);
        Assert.Single(partial.Train);
        Assert.True(partial.PartialLastLine);
    }

    [Theory]
    [InlineData("{\"iter\": 8, \"lr\": 1e-4, \"loss\": 2.0", "line 2: not JSON")]
    [InlineData("{\"iter\": 8, \"lr\": \"high\", \"loss\": 2.0}", "line 2: 'lr' is a string, expected a number or null")]
    [InlineData("{\"lr\": 1e-4, \"loss\": 2.0}", "line 2: 'iter' is missing or not an integer")]
    [InlineData("[1, 2]", "line 2: expected a JSON object, got an array")]
    [InlineData("{\"iter\": 8, \"eval_loss\": \"low\"}", "line 2: 'eval_loss' is a string, expected a number or null")]
    public void ABadLineIsOneErrorNamingTheFileAndLine(string bad, string expected)
    {
        using var dir = new TempDir();
        string path = dir.Write("vis_data/scalars.json", FakeRuns.ScalarsLine(4) + "\n" + bad + "\n" + FakeRuns.ScalarsLine(12) + "\n");
        var e = Assert.Throws<VlmTuneException>(() => RunScalars.Read(path));
        Assert.StartsWith($"{path}: {expected}", e.Message);
        Assert.DoesNotContain('\n', e.Message);

        // The dashboard's lenient read keeps the good lines and the first problem.
        var lenient = RunScalars.ReadLenient(path);
        Assert.Equal([4L, 12L], lenient.Train.Select(p => p.Iter));
        Assert.StartsWith(expected, lenient.Problem);
    }

    [Fact]
    public void AnEmptyOrMissingFileIsOneErrorNamingIt()
    {
        using var dir = new TempDir();
        string empty = dir.Write("vis_data/scalars.json", "");
        var e = Assert.Throws<VlmTuneException>(() => RunScalars.Read(empty));
        Assert.Equal($"{empty}: no iteration logged yet (the file is empty).", e.Message);
        string blank = dir.Write("b/scalars.json", "\n\n");
        Assert.Contains("only blank lines", Assert.Throws<VlmTuneException>(() => RunScalars.Read(blank)).Message);
        string missing = dir["nothing/scalars.json"];
        Assert.StartsWith($"{missing} does not exist", Assert.Throws<VlmTuneException>(() => RunScalars.Read(missing)).Message);
    }
}
