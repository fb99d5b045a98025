using TorchSharp;
using VlmTune.Tests.Support;
using VlmTune.Training;

namespace VlmTune.Tests.Training;

/// <summary>
/// Training steps dispose every tensor handle they make (docs/torchsharp-scalar-race.md, Tensors): a handle left to the
/// GC holds its memory until some collection and is freed on the finaliser thread. TorchSharp counts, per thread, the
/// handles made and disposed; the trainer runs on this one.
/// </summary>
public sealed class TensorLifetimeTests
{
    [FixtureFact]
    public void TrainingStepsLeaveNoTensorHandleToTheFinaliser()
    {
        using var data = new TrainTestData(samples: 8);
        long LiveAfter(int steps)
        {
            DisposeScopeManager.Statistics.Reset();
            using (var trainer = new Trainer(data.Config([$"max_steps={steps}", "batch_size=2", "log_interval=1", "dataloader_num_workers=1",
                       $"work_dir={Path.Combine(data.Dir, $"steps{steps}")}"])))
                trainer.Train();
            return DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        }
        long few = LiveAfter(2), more = LiveAfter(8);
        // Before: optim.AdamW's zero_grad and the gradient checks left two handles per trainable tensor each step.
        Assert.True(more - few <= 0, $"6 more steps left {more - few} more tensor handles undisposed ({few} after 2 steps, {more} after 8)");
    }
}
