using System.Text.RegularExpressions;
using VlmTune.Tests.Support;
using VlmTune.Training;

namespace VlmTune.Tests.Training;

/// <summary>Resuming a run from any of its checkpoints continues it exactly (CPU, fp32).</summary>
[Collection(GlobalTorchRng.Name)]
public sealed class ResumeTests
{
    [FixtureFact]
    public void ResumingFromEveryCheckpointReproducesTheLossesAlsoBeforeImagelessBatches()
    {
        // One sample per iteration and every third sample text-only: some steps give the projector no gradient.
        using var data = new TrainTestData(samples: 6);
        const int steps = 6;
        string[] settings = [$"max_steps={steps}", "batch_size=1", "accumulative_counts=1", "save_steps=1", "save_total_limit=0",
            "log_interval=1", "lora_dropout=0.1", "dataloader_num_workers=0"];
        TrainResult full;
        using (var trainer = new Trainer(data.Config(settings))) full = trainer.Train();
        Assert.Equal(steps, full.Losses.Count);

        // The case that broke: a checkpoint after the projector has been trained, followed by a micro-batch without image.
        string log = File.ReadAllText(Directory.GetFiles(full.RunDir, "*.log").Single());
        var tiles = Regex.Matches(log, @"dynamic ViT batch size: (\d+)").Select(m => int.Parse(m.Groups[1].Value)).ToList();
        Assert.Equal(steps, tiles.Count);
        Assert.Contains(Enumerable.Range(1, steps - 1), k => tiles[k] == 0 && tiles.Take(k).Any(t => t > 0));

        for (int k = 1; k < steps; k++)
        {
            string checkpoint = Path.Combine(data.WorkDir, $"iter_{k}");
            IReadOnlyList<double> resumed;
            using (var trainer = new Trainer(data.Config([.. settings, $"work_dir={Path.Combine(data.Dir, $"from{k}")}"]), new TrainerOptions { Resume = checkpoint }))
                resumed = trainer.Train().Losses;
            Assert.Equal(steps - k, resumed.Count);
            for (int i = 0; i < resumed.Count; i++)
                Assert.True(Math.Abs(resumed[i] - full.Losses[k + i]) <= 1e-5 * Math.Abs(full.Losses[k + i]),
                    $"resumed from iter_{k}: iteration {k + i + 1} loss {resumed[i]} vs {full.Losses[k + i]} uninterrupted (image tiles per iteration: {string.Join(" ", tiles)})");
        }
    }
}
