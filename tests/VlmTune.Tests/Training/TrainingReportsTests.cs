using System.Text;
using System.Text.Json;
using SkiaSharp;
using VlmTune.Tests.Data;
using VlmTune.Tests.Support;
using VlmTune.Training;
using VlmTune.Training.Reports;

namespace VlmTune.Tests.Training;

/// <summary>What a run reports besides its log: TensorBoard event files (report_to) and curves.png at its end.</summary>
public sealed class TrainingReportsTests
{
    private static IterationStats Stats(long iter, double loss, double? gradNorm) =>
        new(iter, 30, 1e-4 * iter, 1, 0.2, 0.01, 512, loss, gradNorm, 2000 + iter, null, iter / 2);

    [Fact]
    public void TheReadersCrcIsCrc32CAndAgreesWithTheWriters()
    {
        var check = "123456789"u8;
        Assert.Equal(0xE3069283u, TensorBoardReader.Crc32C(check));   // the standard check value of CRC-32C
        Assert.Equal(0xE3069283u, TensorBoardWriter.Crc32C(check));
        var random = new Random(3);
        foreach (int length in new[] { 0, 1, 7, 8, 9, 63, 1000 })
        {
            var bytes = new byte[length];
            random.NextBytes(bytes);
            Assert.Equal(TensorBoardReader.Masked(TensorBoardReader.Crc32C(bytes)), TensorBoardWriter.MaskedCrc32C(bytes));
        }
    }

    [Fact]
    public void EventsFileHoldsTheScalarsAndEvalLossInTensorBoardsFormat()
    {
        using var dir = new TempDir();
        var log = new TrainLog(dir.Path, "model: m\n", new DateTime(2026, 12, 1, 10, 0, 0), tensorBoard: true);
        log.Iteration(Stats(10, 2.5, 1.25));
        log.Iteration(Stats(20, double.NaN, null));   // a skipped window and no optimizer step yet: nothing to plot for them
        log.Evaluation(20, 1.75);
        log.Iteration(Stats(30, 1.5, 0.5));
        log.Dispose();

        string events = Assert.Single(Directory.GetFiles(Path.Combine(log.RunDir, "vis_data"), "events.out.tfevents.*"));
        Assert.Equal(log.TensorBoardPath, events);
        Assert.Matches(@"^events\.out\.tfevents\.\d{10}\.[A-Za-z0-9._-]+$", Path.GetFileName(events));
        var read = TensorBoardReader.Read(events);
        Assert.Equal("brain.Event:2", read[0].FileVersion);
        Assert.Empty(read[0].Values);
        Assert.Equal([10L, 20, 20, 30], read.Skip(1).Select(e => e.Step));
        Assert.All(read, e => Assert.InRange(e.WallTime, 1.7e9, 4e9));
        Assert.Equal([("train/loss", 2.5f), ("train/lr", 1e-3f), ("train/grad_norm", 1.25f), ("train/tokens_per_s", 2010f)], read[1].Values);
        Assert.Equal([("train/lr", 2e-3f), ("train/tokens_per_s", 2020f)], read[2].Values);
        Assert.Equal([("eval/loss", 1.75f)], read[3].Values);
        Assert.Equal(("train/loss", 1.5f), read[4].Values[0]);

        // The same run in scalars.json: the eval line is told from training lines by having no "loss".
        var lines = File.ReadAllLines(log.ScalarsPath);
        Assert.Equal(4, lines.Length);
        using var evalLine = JsonDocument.Parse(lines[2]);
        Assert.Equal(["eval_loss", "iter", "step"], evalLine.RootElement.EnumerateObject().Select(p => p.Name));
        var scalars = RunScalars.Read(log.ScalarsPath);
        Assert.Equal([new EvalPoint(20, 1.75)], scalars.Eval);
        Assert.Equal([10L, 20, 30], scalars.Train.Select(p => p.Iter));
    }

    [Fact]
    public void TheReaderRefusesACorruptedRecord()
    {
        using var dir = new TempDir();
        string path;
        using (var writer = TensorBoardWriter.Create(dir.Path))
        {
            writer.Scalars(5, [("train/loss", 1.0)]);
            path = writer.Path;
        }
        var bytes = File.ReadAllBytes(path);
        Assert.Equal(2, TensorBoardReader.Read(bytes, path).Count);
        bytes[^6] ^= 0x40;   // inside the last record's data
        Assert.Contains("the data's CRC does not match", Assert.Throws<InvalidDataException>(() => TensorBoardReader.Read(bytes, path)).Message);
    }

    [Fact]
    public void ClosingTheLogDrawsTheCurvesOfWhatWasLogged()
    {
        using var dir = new TempDir();
        var log = new TrainLog(dir.Path, "model: m\n");
        var lines = new List<string>();
        log.Echo = lines.Add;
        for (int i = 1; i <= 5; i++) log.Iteration(Stats(i * 6, 3.0 / i, 1.0));
        log.Dispose();

        Assert.False(Directory.EnumerateFiles(log.RunDir, "events.out.tfevents.*", SearchOption.AllDirectories).Any());   // report_to is off
        using var bitmap = SKBitmap.Decode(log.CurvesPath);
        Assert.Equal((TrainingCurves.DefaultWidth, TrainingCurves.DefaultHeight), (bitmap.Width, bitmap.Height));
        Assert.Contains(lines, l => l.EndsWith($"training curves: {log.CurvesPath}"));
        Assert.Contains($"training curves: {log.CurvesPath}", File.ReadAllText(log.LogPath));

        // A run that logged nothing (it failed while loading) gets no figure of nothing.
        var empty = new TrainLog(Path.Combine(dir.Path, "other"), "model: m\n");
        empty.Dispose();
        Assert.False(File.Exists(empty.CurvesPath));
    }

    [FixtureFact]
    public void ATrainingRunWithReportToTensorboardWritesEventsAndCurves()
    {
        using var data = new TrainTestData(samples: 6);
        string runDir;
        TrainResult result;
        using (var trainer = new Trainer(data.Config("max_steps=4", "log_interval=2", "report_to=tensorboard", "dataloader_num_workers=0")))
        {
            result = trainer.Train();
            runDir = result.RunDir;
        }
        var scalars = RunScalars.Read(Path.Combine(runDir, "vis_data", "scalars.json"));
        var events = TensorBoardReader.Read(Assert.Single(Directory.GetFiles(Path.Combine(runDir, "vis_data"), "events.out.tfevents.*")));
        Assert.Equal([2L, 4], events.Skip(1).Select(e => e.Step));
        Assert.Equal(scalars.Train.Select(p => (float)p.Loss!.Value), events.Skip(1).Select(e => e.Values.Single(v => v.Tag == "train/loss").Value));
        Assert.Equal(scalars.Train.Select(p => (float)p.GradNorm!.Value), events.Skip(1).Select(e => e.Values.Single(v => v.Tag == "train/grad_norm").Value));
        using var bitmap = SKBitmap.Decode(Path.Combine(runDir, TrainingCurves.FileName));
        Assert.NotNull(bitmap);
        Assert.Contains("training curves: ", File.ReadAllText(Directory.GetFiles(runDir, "*.log").Single(), Encoding.UTF8));
    }
}
