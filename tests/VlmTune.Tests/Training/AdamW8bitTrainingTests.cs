using System.Text.RegularExpressions;
using VlmTune.Checkpoints;
using VlmTune.Tests.Support;
using VlmTune.Training;

namespace VlmTune.Tests.Training;

/// <summary>
/// optim: adamw_8bit in the trainer (CPU, the tiny model; its head's LoRA B and the projector are large enough for
/// 8-bit states, the other LoRA tensors keep fp32 ones): the run learns, says what its state takes, resumes exactly,
/// and a checkpoint of the other optimizer is refused.
/// </summary>
[Collection(GlobalTorchRng.Name)]
public sealed class AdamW8bitTrainingTests
{
    [FixtureFact]
    public void ThirtyStepsDriveTheLossDownAndTheLogShowsTheStateBytes()
    {
        using var data = new TrainTestData();
        using var trainer = new Trainer(data.Config("optim=adamw_8bit", "lr=0.01"));
        var result = trainer.Train();
        Assert.Equal(30, result.Losses.Count);
        double first = result.Losses.Take(3).Average(), last = result.Losses.TakeLast(5).Average();
        Assert.True(last < 0.5 * first, $"loss went from {first:F3} to {last:F3}");

        string log = File.ReadAllText(Directory.GetFiles(result.RunDir, "*.log").Single());
        var line = Regex.Match(log, @"optimizer: adamw_8bit, 8-bit block-wise AdamW states \(bitsandbytes' AdamW8bit, blocks of 256\): ([\d.,]+) MiB for ([\d,]+) parameters \(fp32 states: ([\d.,]+) MiB\); (\d+) of (\d+) tensors 8-bit");
        Assert.True(line.Success, log);
        double eightBit = double.Parse(line.Groups[1].Value), fp32 = double.Parse(line.Groups[3].Value);
        int blockwise = int.Parse(line.Groups[4].Value), tensors = int.Parse(line.Groups[5].Value);
        Assert.InRange(blockwise, 1, tensors - 1);
        Assert.True(eightBit < 0.5 * fp32, $"8-bit states {eightBit} MiB against fp32 {fp32} MiB");
    }

    [FixtureFact]
    public void AResumedEightBitRunContinuesBitIdentically()
    {
        using var data = new TrainTestData(samples: 6);
        string[] settings = ["optim=adamw_8bit", "max_steps=6", "batch_size=1", "save_steps=3", "save_total_limit=0", "lora_dropout=0.1", "dataloader_num_workers=0"];
        TrainResult full;
        using (var trainer = new Trainer(data.Config(settings))) full = trainer.Train();
        string resumedDir = Path.Combine(data.Dir, "resumed");
        TrainResult resumed;
        using (var trainer = new Trainer(data.Config([.. settings, $"work_dir={resumedDir}"]), new TrainerOptions { Resume = Path.Combine(data.WorkDir, "iter_3") }))
            resumed = trainer.Train();
        Assert.Equal(full.Losses.Skip(3), resumed.Losses);   // exactly
        // The optimizer files (codes, absmax, fp32 moments, step) and the adapters of the last checkpoint are identical.
        Assert.True(AdamW8bit.IsStateFile(Path.Combine(data.WorkDir, "iter_6", IterCheckpoint.OptimizerFile)));
        Assert.Equal(File.ReadAllBytes(Path.Combine(data.WorkDir, "iter_6", IterCheckpoint.OptimizerFile)),
                     File.ReadAllBytes(Path.Combine(resumedDir, "iter_6", IterCheckpoint.OptimizerFile)));
        using var a = SafetensorsFile.Open(Path.Combine(data.WorkDir, "iter_6", PeftAdapter.WeightsFile));
        using var b = SafetensorsFile.Open(Path.Combine(resumedDir, "iter_6", PeftAdapter.WeightsFile));
        foreach (var name in a.Entries.Keys)
        {
            using var x = a.Read(name);
            using var y = b.Read(name);
            Assert.True(x.eq(y).all().item<bool>(), $"{name} differs after the resume");
        }
    }

    [FixtureFact]
    public void ResumingWithTheOtherOptimizerIsRefusedNamingTheKeyAndTheFile()
    {
        using var data = new TrainTestData(samples: 3);
        string[] settings = ["max_steps=1", "batch_size=1", "save_steps=1", "dataloader_num_workers=0"];
        using (var trainer = new Trainer(data.Config(settings))) trainer.Train();
        string checkpoint = Path.Combine(data.WorkDir, "iter_1");
        using var resumed = new Trainer(data.Config([.. settings, "optim=paged_adamw_8bit", $"work_dir={Path.Combine(data.Dir, "other")}"]), new TrainerOptions { Resume = checkpoint });
        var e = Assert.Throws<ConfigException>(() => resumed.Setup());
        var problem = Assert.Single(e.Problems);
        Assert.Contains($"'optim' is paged_adamw_8bit but {Path.Combine(checkpoint, IterCheckpoint.OptimizerFile)} holds adamw states, which do not convert", problem);
        Assert.Contains("resume with optim: adamw, or start a new run", problem);
    }
}
