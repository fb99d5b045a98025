using VlmTune.Cuda;
using VlmTune.Gpu.Tests.Support;
using VlmTune.Inference;
using static TorchSharp.torch;

namespace VlmTune.Gpu.Tests;

/// <summary>
/// Fused decode steps replayed as CUDA graphs (FusedDecodeTuning.Graphs, Cuda/KernelGraphs.cs) against the same steps
/// launched one kernel at a time: the same kernels with the same arguments, so the logits are equal bit for bit at
/// every step, across the 128-key boundary where the split count (hence the graph) changes; the steps are replayed,
/// not captured again; and both stay within the tolerance of the TorchSharp decoder.
/// </summary>
[Trait("Category", "Gpu")]
public class FusedDecoderGraphTests(ITestOutputHelper output)
{
    private const int PromptTokens = 100, Steps = 40;   // 101..140 keys: one split, then two

    public static TheoryData<string, int, Rows, Gemv> Cases() => new()
    {
        { "internlm2-d128", 1, Rows.Aligned, Gemv.CudaCores },
        { "qwen2-d128", 3, Rows.Ragged, Gemv.CudaCores },      // q/k/v biases, positions and first columns through the slots
        { "qwen3-d128", 8, Rows.Ragged, Gemv.TensorCores },    // q/k norms, the tensor-core GEMV
        { "phi3-d96", 1, Rows.Aligned, Gemv.CudaCores },
    };

    [GpuTheory]
    [MemberData(nameof(Cases))]
    public void GraphStepsGiveTheLaunchedStepsLogitsBitForBit(string model, int batch, Rows rows, Gemv gemv)
    {
        var device = TestDevice.Cuda;
        var lm = DecodeModels.Get(model, device);
        var fused = FusedDecoder.TryGet(lm, enabled: true, out var reason);
        Assert.True(fused is not null, $"the fused decoder is unavailable for {model}: {reason}");
        Assert.True(CudaDriver.Shared.SupportsGraphs, "this driver has no CUDA graph API");
        var tuning = new FusedDecodeTuning { TensorCores = gemv == Gemv.TensorCores };

        List<Tensor> Run(FusedDecodeTuning t, List<GraphRun> how)
        {
            var logits = new List<Tensor>();
            using var result = DecodeComparison.Run(lm, device, batch, rows == Rows.Ragged, PromptTokens, Steps, (token, cache, r) =>
            {
                var l = fused!.Step(token, cache, r.Positions, r.FirstColumn, t);
                how.Add(fused.LastRun);
                logits.Add(l.clone().DetachFromDisposeScope());
                return l;
            }, seed: 3);
            Assert.True(DecodeComparison.Failures(result.Steps) is null, $"{model}: {DecodeComparison.Failures(result.Steps)}");
            Assert.True(result.CachesAgree(), $"{model}: the cache positions differ from the reference's");
            return logits;
        }
        var launchedHow = new List<GraphRun>();
        var graphHow = new List<GraphRun>();
        var launched = Run(tuning, launchedHow);
        var replayed = Run(tuning with { Graphs = true }, graphHow);
        try
        {
            Assert.All(launchedHow, h => Assert.Equal(GraphRun.Direct, h));
            using var compare = NewDisposeScope();
            for (int i = 0; i < Steps; i++)
                Assert.True(launched[i].eq(replayed[i]).all().item<bool>(), $"{model}, batch {batch}, {rows}: step {i} ({graphHow[i]}) differs from the launched step");
            output.WriteLine($"{model}, batch {batch}, {rows}, {gemv}: {string.Join(" ", graphHow.GroupBy(h => h).Select(g => $"{g.Key} {g.Count()}"))}");
            // Each split count's steps: one launched, one captured, the rest replayed.
            Assert.Equal(2, graphHow.Count(h => h == GraphRun.Captured));
            Assert.Equal(Steps - 4, graphHow.Count(h => h == GraphRun.Replayed));
        }
        finally
        {
            foreach (var t in launched.Concat(replayed)) t.Dispose();
        }
    }
}
