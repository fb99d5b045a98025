using SkiaSharp;
using VlmTune.Tests.Data;
using VlmTune.Tests.Support;
using VlmTune.Tests.Training;
using VlmTune.Training.Reports;

namespace VlmTune.Tests.Cli;

/// <summary><c>vlmtune plot</c> through the real CLI: where the PNG goes, what it says, and one line for bad input.</summary>
public sealed class PlotCommandTests
{
    [Fact]
    public async Task ARunFolderGetsItsCurvesBesideItsScalars()
    {
        using var dir = new TempDir();
        string run = FakeRuns.Write(dir.Path, "lora", "20261201_100000", upTo: 40, evals: [(20, 2.0), (40, 1.2)]);
        var (code, stdout, stderr) = await CliProcess.RunAsync(["plot", run], timeoutSeconds: 120);
        Assert.True(code == 0, stderr);
        string png = Path.Combine(run, TrainingCurves.FileName);
        Assert.Equal($"wrote {png} (1 run, lora/20261201_100000: 10 iterations logged, 2 evaluations)", stdout.Trim());
        Assert.Equal("", stderr);
        using var bitmap = SKBitmap.Decode(png);
        Assert.Equal((TrainingCurves.DefaultWidth, TrainingCurves.DefaultHeight), (bitmap.Width, bitmap.Height));
    }

    [Fact]
    public async Task AWorkDirOfSeveralRunsIsOneFigureWhereAsked()
    {
        using var dir = new TempDir();
        FakeRuns.Write(dir.Path, "lora", "20261201_100000", upTo: 20);
        FakeRuns.Write(dir.Path, "lora", "20261201_120000", upTo: 12);
        string empty = Path.Combine(dir.Path, "lora", "20261201_130000");   // failed while loading: nothing logged
        Directory.CreateDirectory(Path.Combine(empty, "vis_data"));
        File.WriteAllText(Path.Combine(empty, "vis_data", "scalars.json"), "");
        string output = dir["plots/both.png"];
        Directory.CreateDirectory(dir["plots"]);

        var (code, stdout, stderr) = await CliProcess.RunAsync(["plot", Path.Combine(dir.Path, "lora"), "-o", output, "--width", "640", "--height", "480"], timeoutSeconds: 120);
        Assert.True(code == 0, stderr);
        Assert.Contains("(2 runs, lora/20261201_100000: 5 iterations logged, lora/20261201_120000: 3 iterations logged)", stdout);
        Assert.Equal($"warning: {Path.Combine(empty, "vis_data", "scalars.json")}: no iteration logged yet; lora/20261201_130000 left out", stderr.Trim());
        using var bitmap = SKBitmap.Decode(output);
        Assert.Equal((640, 480), (bitmap.Width, bitmap.Height));
    }

    [Fact]
    public async Task ABadLineIsOneErrorLineNamingTheFileAndLine()
    {
        using var dir = new TempDir();
        string run = FakeRuns.Write(dir.Path, "lora", "20261201_100000", upTo: 12);
        string scalars = Path.Combine(run, "vis_data", "scalars.json");
        File.AppendAllText(scalars, "{\"iter\": 16, \"loss\": \"nan\"}\n");
        var (code, stdout, stderr) = await CliProcess.RunAsync(["plot", run], timeoutSeconds: 120);
        Assert.Equal(1, code);
        Assert.Equal($"error: {scalars}: line 4: 'loss' is a string, expected a number or null", stderr.Trim());
        Assert.Equal("", stdout);
        Assert.False(File.Exists(Path.Combine(run, TrainingCurves.FileName)));
        Assert.Empty(Directory.GetFiles(run, "*.tmp-*"));
    }

    [Fact]
    public async Task AnEmptyRunOrAFolderWithoutRunsIsOneErrorLine()
    {
        using var dir = new TempDir();
        string scalars = dir.Write("w/20261201_100000/vis_data/scalars.json", "");
        var (code, _, stderr) = await CliProcess.RunAsync(["plot", dir["w"]], timeoutSeconds: 120);
        Assert.Equal(1, code);
        Assert.Equal($"error: {scalars}: no iteration logged yet (the file is empty).", stderr.Trim());

        Directory.CreateDirectory(dir["nothing"]);
        (code, _, stderr) = await CliProcess.RunAsync(["plot", dir["nothing"]], timeoutSeconds: 120);
        Assert.Equal(1, code);
        Assert.Single(stderr.Trim().Split('\n'));
        Assert.StartsWith($"error: {dir["nothing"]}: no run folder found", stderr.Trim());
    }
}
