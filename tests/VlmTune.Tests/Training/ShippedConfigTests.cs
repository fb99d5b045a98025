using VlmTune.Tests.Support;
using VlmTune.Training;

namespace VlmTune.Tests.Training;

/// <summary>The configs in configs/ stay valid: the CLoT recipe parses, the quick start trains.</summary>
public sealed class ShippedConfigTests
{
    private static string ConfigPath(string name) => Path.Combine(Fixtures.RepoRoot, "configs", name);

    [Fact]
    public void ClotQloraRecipeParsesWithTheXtunerSettings()
    {
        var c = TrainConfig.Load(ConfigPath("internvl2_2b_qlora_clot.yaml"));
        Assert.Equal(TrainMode.Qlora, c.Mode);
        Assert.Equal((128, 256.0), (c.LoraR, c.LoraAlpha));
        Assert.Equal((4, 4), (c.BatchSize, c.AccumulativeCounts));
        Assert.Equal("internvl2_2b_qlora_clot", c.RunName);
    }

    [FixtureFact]
    public void QuickStartConfigTrains()
    {
        // The config's paths are relative to the repository root (where the README runs it); resolve them from there
        // rather than changing the process's working directory under parallel tests.
        string work = Path.Combine(Path.GetTempPath(), "vlmtune-quickstart-" + Guid.NewGuid().ToString("N"));
        try
        {
            string path = ConfigPath("tiny_lora_cpu.yaml");
            var shipped = TrainConfig.Load(path);
            string Root(string relative) => Path.GetFullPath(Path.Combine(Fixtures.RepoRoot, relative));
            var config = TrainConfig.Load(path, [$"model={Root(shipped.Model)}", $"data={Root(shipped.Data.Single())}",
                $"image_root={Root(shipped.ImageRoot!)}", "max_steps=4", "save_steps=0", $"work_dir={work}"]);
            using var trainer = new Trainer(config);
            var result = trainer.Train();
            Assert.Equal(4, result.Iterations);
            Assert.Equal(8, trainer.Dataset.Samples.Count);
            Assert.Equal(0, result.Counters.BrokenImages + result.Counters.BadRecords);
            Assert.All(result.Losses, l => Assert.True(double.IsFinite(l)));
        }
        finally
        {
            if (Directory.Exists(work)) Directory.Delete(work, true);
        }
    }
}
