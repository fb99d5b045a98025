using System.Text.Json;
using System.Text.RegularExpressions;
using VlmTune.Checkpoints;
using VlmTune.Tests.Support;
using VlmTune.Training;

namespace VlmTune.Tests.Training;

/// <summary>End-to-end training runs of the tiny model on CPU (fp32) on small generated data.</summary>
public sealed class TrainerTests
{
    [FixtureTheory]
    [InlineData("full", "0.01")]
    [InlineData("lora", "0.01")]
    [InlineData("qlora", "0.01")]
    public void ThirtyStepsDriveTheLossDown(string mode, string lr)
    {
        using var data = new TrainTestData();
        using var trainer = new Trainer(data.Config($"mode={mode}", $"lr={lr}"));
        var result = trainer.Train();
        Assert.Equal(30, result.Losses.Count);
        Assert.All(result.Losses, l => Assert.True(double.IsFinite(l)));
        double first = result.Losses.Take(3).Average(), last = result.Losses.TakeLast(5).Average();
        Console.WriteLine($"{mode}: first {first:F3} last {last:F3}: {string.Join(" ", result.Losses.Select(l => l.ToString("F2")))}");
        Assert.True(last < 0.5 * first, $"{mode}: loss went from {first:F3} to {last:F3}");
        Assert.Equal(30, result.OptimizerSteps);
        Assert.NotNull(result.LastCheckpoint);
    }
}
