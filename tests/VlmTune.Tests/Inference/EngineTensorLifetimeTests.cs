using VlmTune.Checkpoints;
using VlmTune.Inference;
using VlmTune.Models;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Inference;

/// <summary>
/// The engine's loop disposes every tensor handle it makes: with the caches off, what its thread holds when idle does
/// not grow with the requests served (docs/torchsharp-scalar-race.md, Tensors). A handle left to the GC would hold
/// its memory (on a GPU, where the GC does not look) until some collection, and be freed on the finaliser thread.
/// </summary>
public sealed class EngineTensorLifetimeTests
{
    [FixtureFact]
    public async Task ServingRequestsLeavesNoTensorHandleBehind()
    {
        using var model = InternVLModelLoader.Load(Fixtures.TinyModel, new ModelOptions());
        var ids = Fixtures.PromptIds("text_only");
        using var engine = new InferenceEngine(model, 92546, new EngineOptions { PrefixCacheBytes = 0, ImageCacheBytes = 0 });
        async Task<long> IdleAfter(int requests, SamplingOptions sampling)
        {
            // Different prompt lengths: batched prefill with padding, rows joining and leaving the decode batch.
            var streams = Enumerable.Range(0, requests)
                .Select(i => engine.Submit(new GenerationRequest { PromptIds = ids[..(20 + 3 * i)], Sampling = sampling with { Seed = i } })).ToList();
            foreach (var s in streams) await s.Completion;
            for (int i = 0; i < 400 && engine.Stats.Running > 0; i++) await Task.Delay(25);
            for (int i = 0; i < 40 && engine.IdleTensorHandles < 0; i++) await Task.Delay(25);
            await Task.Delay(100);   // the loop reaches its idle wait after the last stream completes
            return engine.IdleTensorHandles;
        }
        var greedy = new SamplingOptions { MaxNewTokens = 12 };
        var sampled = new SamplingOptions { MaxNewTokens = 12, Temperature = 0.8, TopP = 0.9, TopK = 20, RepetitionPenalty = 1.1 };
        long first = await IdleAfter(2, greedy);
        Assert.True(first >= 0, "the engine never went idle");
        long afterGreedy = await IdleAfter(5, greedy), afterSampled = await IdleAfter(6, sampled);
        Assert.True(afterGreedy <= first && afterSampled <= first,
            $"tensor handles held by the idle loop: {first} after 2 requests, {afterGreedy} after 5 more, {afterSampled} after 6 sampled ones");
    }
}
