using VlmTune.Training;
using static TorchSharp.torch;

namespace VlmTune.Tests.Training;

/// <summary>
/// The CPU side of the fused optimizer step (its numerics are GPU tests: tests/VlmTune.Gpu.Tests/FusedAdamWTests.cs):
/// how elements are dealt to blocks, and that CPU training keeps TorchSharp's AdamW.
/// </summary>
public class FusedAdamWPlanTests
{
    [Fact]
    public void EveryElementFallsInExactlyOneChunkOfItsTensor()
    {
        long c = FusedAdamW.ChunkElements;
        long[] counts = [1, c, c + 1, 0, 3 * c - 5];
        var chunks = FusedAdamW.PlanChunks(counts);
        Assert.Equal(1 + 1 + 2 + 0 + 3, chunks.Count);
        Assert.Equal([(0, 0L), (1, 0L), (2, 0L), (2, c), (4, 0L), (4, c), (4, 2 * c)], chunks);
        for (int t = 0; t < counts.Length; t++)
        {
            long covered = chunks.Where(k => k.Tensor == t).Sum(k => Math.Min(c, counts[t] - k.Start));
            Assert.Equal(counts[t], covered);
        }
    }

    [Fact]
    public void OnTheCpuTheOptimizerKeepsTorchSharpsAdamW()
    {
        var config = new TrainConfig { Model = "unused" };
        using var p = new TorchSharp.Modules.Parameter(zeros(3), requires_grad: true);
        var messages = new List<string>();
        using var optimizer = new TrainingOptimizer(config, [("w", p)], dp: null, rank: 0, messages.Add, fusedKernel: true);
        Assert.False(optimizer.Fused);
        p.grad = ones(3);
        Assert.False(FusedAdamW.Accepts(p));   // a CPU tensor: the kernels take CUDA fp32 only
        Assert.DoesNotContain(messages, m => m.Contains("fused", StringComparison.OrdinalIgnoreCase));   // nothing to warn about on a CPU run
    }
}
