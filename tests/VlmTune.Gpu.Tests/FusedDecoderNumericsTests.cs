using VlmTune.Cuda;
using VlmTune.Gpu.Tests.Support;
using VlmTune.Inference;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Gpu.Tests;

public enum Rows { Aligned, Ragged }

public enum Gemv { CudaCores, TensorCores }

/// <summary>
/// The fused CUDA decoder (Inference/FusedDecoder.cs, Cuda/Kernels/decode.cu) against the TorchSharp decode path it
/// replaces, on every layout it runs (InternLM2's wqkv; the Llama layout plain, with Qwen2's biases, with Qwen3's q/k
/// norms and tied head), on each batch bucket (1, 4, 8, 16, 32 and a second grid row past 32), with the CUDA-core and
/// the tensor-core GEMV: logits within <see cref="LogitTolerance"/> at every step, the same clear greedy choices, the
/// argmax kernel equal to argmax, and the cache's positions written as the reference writes them.
/// </summary>
[Trait("Category", "Gpu")]
public class FusedDecoderNumericsTests(ITestOutputHelper output)
{
    /// <summary>Past one 128-key attention split, and across the second boundary (256) while decoding: split and combine both run.</summary>
    public const int PromptTokens = 250;
    public const int Steps = 8;

    public static TheoryData<string, int, Rows, Gemv> Cases() => CasesOf(DecodeModels.Checkpoints.Concat(DecodeModels.ShapeTrue));

    /// <summary>Every batch bucket of each model, aligned and ragged, with each GEMV its shapes can take.</summary>
    public static TheoryData<string, int, Rows, Gemv> CasesOf(IEnumerable<string> models)
    {
        var data = new TheoryData<string, int, Rows, Gemv>();
        foreach (var model in models)
        {
            data.Add(model, 1, Rows.Aligned, Gemv.CudaCores);
            data.Add(model, 3, Rows.Ragged, Gemv.CudaCores);     // bucket 4, one padding row
            data.Add(model, 3, Rows.Aligned, Gemv.CudaCores);
            // Bucket 8; bucket 16 with 3 padding rows; bucket 32 and a second grid row holding one sequence.
            foreach (int batch in new[] { 8, 13, 33 })
            {
                data.Add(model, batch, Rows.Ragged, Gemv.CudaCores);
                if (DecodeModels.TensorCoreCapable.Contains(model)) data.Add(model, batch, Rows.Ragged, Gemv.TensorCores);
            }
        }
        return data;
    }

    [GpuTheory]
    [MemberData(nameof(Cases))]
    public void FusedStepsMatchTheTorchSharpDecoder(string model, int batch, Rows rows, Gemv gemv) =>
        AssertFusedStepsMatch(output, model, batch, rows, gemv, PromptTokens, Steps);

    /// <summary>
    /// Teacher-forced decoding of <paramref name="model"/> (<see cref="DecodeModels"/>) on CUDA, the fused decoder against
    /// the TorchSharp path from one prefill of <paramref name="promptTokens"/>: logits within the tolerance at every
    /// step, the argmax kernel's first maxima, the cache's positions; the GEMV kind asked for must be the one that runs.
    /// </summary>
    public static void AssertFusedStepsMatch(ITestOutputHelper output, string model, int batch, Rows rows, Gemv gemv, int promptTokens, int steps)
    {
        var device = TestDevice.Cuda;
        var lm = DecodeModels.Get(model, device);
        var fused = FusedDecoder.TryGet(lm, enabled: true, out var reason);
        Assert.True(fused is not null, $"the fused decoder is unavailable for {model}: {reason}");
        // The path under test must be the one that runs: tensor cores from bucket 8 on sm_80+, where the shapes allow.
        bool mmaPossible = FusedDecodePlan.UseTensorCores(batch, CudaDriver.Shared.ComputeCapability(device.index < 0 ? 0 : device.index), lm.Config);
        if (gemv == Gemv.TensorCores) Assert.True(mmaPossible, $"{model} at batch {batch} would not use the tensor-core GEMV");

        var greedyMismatches = new List<string>();
        var tuning = new FusedDecodeTuning { TensorCores = gemv == Gemv.TensorCores };
        {
            using var result = DecodeComparison.Run(lm, device, batch, rows == Rows.Ragged, promptTokens, steps, (token, cache, r) =>
            {
                Assert.True(fused!.CanStep(cache), "the fused decoder declines the step");
                var logits = fused.Step(token, cache, r.Positions, r.FirstColumn, tuning);
                // The argmax kernel greedy callers use must pick the first maximum (bf16 logits tie often).
                var ids = fused.Greedy(logits).view(batch);
                var isMax = logits.eq(logits.max(-1, keepdim: true).values);                                   // (B, V)
                var expected = where(isMax, arange(logits.shape[1], device: device).unsqueeze(0), logits.shape[1]).amin([1L]);
                if (!ids.eq(expected).all().item<bool>())
                    greedyMismatches.Add($"argmax_rows {string.Join(",", ids.cpu().data<long>().ToArray())}, first maxima {string.Join(",", expected.cpu().data<long>().ToArray())}");
                return logits;
            }, seed: 1000 + batch);

            foreach (var step in result.Steps) output.WriteLine(step.ToString());
            Assert.True(DecodeComparison.Failures(result.Steps) is null, $"{model}, batch {batch}, {rows}, {gemv}:\n{DecodeComparison.Failures(result.Steps)}");
            Assert.Empty(greedyMismatches);
            // The kernels write layer 0's positions table themselves.
            Assert.True(result.CachesAgree(), "the fused decoder's cache length or positions differ from the reference's");
        }
    }
}
