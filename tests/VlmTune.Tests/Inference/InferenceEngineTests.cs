using VlmTune.Inference;
using VlmTune.Tests.Models;
using VlmTune.Tests.Support;
using static TorchSharp.torch;

namespace VlmTune.Tests.Inference;

public sealed class InferenceEngineTests(TinyModelFixture tiny) : IClassFixture<TinyModelFixture>
{
    private static readonly HashSet<int> Stop = [92542];

    private static int[] Ids(string caseName, string field) =>
        Fixtures.Golden.GetProperty("cases").GetProperty(caseName).GetProperty(field).EnumerateArray().Select(e => e.GetInt32()).ToArray();

    private static Tensor CloverPixels() => Fixtures.GoldenTensors.Read("pixel_values.clot");

    private InferenceEngine NewEngine(EngineOptions? options = null) => new(tiny.Model, TinyModelFixture.ImageContextId, options);

    /// <summary>What the single-sequence reference generator gives for this prompt.</summary>
    private int[] Alone(IReadOnlyList<int> prompt, bool image, SamplingOptions sampling)
    {
        using var scope = NewDisposeScope();
        Tensor? features = null;
        if (image) using (no_grad()) features = tiny.Model.ExtractFeatures(CloverPixels());
        return TokenGenerator.Generate(tiny.Model, prompt, features, TinyModelFixture.ImageContextId, sampling, Stop).TokenIds.ToArray();
    }

    [FixtureTheory]
    [InlineData("text_only")]
    [InlineData("one_image")]
    public async Task EngineGivesGoldenGreedyIds(string caseName)
    {
        using var engine = NewEngine();
        var expected = Ids(caseName, "greedy_ids");
        var stream = engine.Submit(new GenerationRequest
        {
            PromptIds = Ids(caseName, "prompt_ids"),
            Pixels = caseName == "one_image" ? CloverPixels() : null,
            Sampling = new SamplingOptions { MaxNewTokens = expected.Length },
            StopIds = Stop,
        });
        var streamed = new List<int>();
        await foreach (var id in stream.ReadTokensAsync()) streamed.Add(id);
        var result = await stream.Completion;
        Assert.Equal(expected, result.TokenIds);
        Assert.Equal(expected, streamed);
        Assert.Equal(FinishReason.Length, result.FinishReason);
    }

    /// <summary>
    /// 16 requests of different lengths (with and without an image, one crossing the dynamic-NTK threshold of 512
    /// while it decodes, one starting beyond it, some sampling with a seed) submitted together equal each run alone.
    /// </summary>
    [FixtureFact]
    public async Task ConcurrentRequestsEqualSolitaryRuns()
    {
        var text = Ids("text_only", "prompt_ids");
        var image = Ids("one_image", "prompt_ids");
        var rng = new Random(7);
        var cases = new List<(int[] Prompt, bool Image, SamplingOptions Sampling)>();
        for (int i = 0; i < 16; i++)
        {
            int[] prompt = (i % 4) switch
            {
                0 => image,
                1 => text[..(10 + i)],
                2 => text.Concat(Enumerable.Range(0, 20 * i).Select(_ => rng.Next(1000, 90000))).ToArray(),
                _ => text,
            };
            var sampling = new SamplingOptions { MaxNewTokens = 8 + i % 5 };
            if (i == 3) sampling = sampling with { Temperature = 0.8, TopP = 0.9, TopK = 50, Seed = 1234 };
            if (i == 7) sampling = sampling with { RepetitionPenalty = 1.3 };
            cases.Add((prompt, i % 4 == 0, sampling));
        }
        // Crosses 512 while decoding, and starts beyond it.
        cases[5] = (text.Concat(Enumerable.Range(0, 505 - text.Length).Select(_ => rng.Next(1000, 90000))).ToArray(), false, new SamplingOptions { MaxNewTokens = 12 });
        cases[9] = (text.Concat(Enumerable.Range(0, 560 - text.Length).Select(_ => rng.Next(1000, 90000))).ToArray(), false, new SamplingOptions { MaxNewTokens = 6 });

        var expected = cases.Select(c => Alone(c.Prompt, c.Image, c.Sampling)).ToList();

        using var engine = NewEngine();
        var streams = cases.Select(c => engine.Submit(new GenerationRequest
        {
            PromptIds = c.Prompt, Pixels = c.Image ? CloverPixels() : null, Sampling = c.Sampling, StopIds = Stop,
        })).ToList();
        var results = await Task.WhenAll(streams.Select(s => s.Completion));
        for (int i = 0; i < cases.Count; i++) Assert.True(expected[i].SequenceEqual(results[i].TokenIds), $"request {i}: [{string.Join(",", results[i].TokenIds)}] vs alone [{string.Join(",", expected[i])}]");
        Assert.True(engine.Stats.PeakBatch > 1, $"requests never decoded together (peak batch {engine.Stats.PeakBatch})");
        Assert.Equal(0, engine.Stats.Running);
    }

    /// <summary>Requests that join while others are mid-answer (and leave at different times) still equal their solo runs.</summary>
    [FixtureFact]
    public async Task RequestsJoiningARunningBatchEqualSolitaryRuns()
    {
        var text = Ids("text_only", "prompt_ids");
        var image = Ids("one_image", "prompt_ids");
        var waves = new (int[] Prompt, bool Image, int MaxNew)[]
        {
            (text, false, 120), (text[..20], false, 100), (image, true, 25), (text[..33], false, 12), (text[..45], false, 20), (image, true, 8),
        };
        var expected = waves.Select(w => Alone(w.Prompt, w.Image, new SamplingOptions { MaxNewTokens = w.MaxNew })).ToList();

        using var engine = NewEngine();
        var results = new List<Task<GenerationResult>>();
        TokenGate? previous = null;
        foreach (var w in waves)
        {
            // Each request joins while the previous one decodes: that one is held at its third token until this is submitted.
            if (previous is not null) await previous.PausedAsync(results[^1]);
            var gate = new TokenGate(pauseAt: 3);
            results.Add(engine.Submit(new GenerationRequest
            {
                PromptIds = w.Prompt, Pixels = w.Image ? CloverPixels() : null, Sampling = new SamplingOptions { MaxNewTokens = w.MaxNew }, StopIds = Stop, Observer = gate,
            }).Completion);
            previous?.Resume();
            previous = gate;
        }
        previous!.Resume();
        var done = await Task.WhenAll(results);
        for (int i = 0; i < waves.Length; i++) Assert.True(expected[i].SequenceEqual(done[i].TokenIds), $"request {i} differs from its solo run");
        Assert.True(engine.Stats.PeakBatch >= 3, $"peak batch {engine.Stats.PeakBatch}: requests did not join a running batch");
    }

    [FixtureFact]
    public async Task CancellingRemovesTheRequestAndOthersCarryOn()
    {
        using var engine = NewEngine();
        var text = Ids("text_only", "prompt_ids");
        using var cts = new CancellationTokenSource();
        var gate = new TokenGate(pauseAt: 1);   // cancelled while the engine is held at its first token
        var doomed = engine.Submit(new GenerationRequest { PromptIds = text, Sampling = new SamplingOptions { MaxNewTokens = 400 }, Observer = gate }, cts.Token);
        var survivor = engine.Submit(new GenerationRequest { PromptIds = text[..30], Sampling = new SamplingOptions { MaxNewTokens = 60 } });
        await gate.PausedAsync(doomed.Completion);
        cts.Cancel();
        gate.Resume();
        var cancelled = await doomed.Completion;
        Assert.Equal(FinishReason.Cancelled, cancelled.FinishReason);
        Assert.True(cancelled.TokenIds.Count < 400);
        var rest = await survivor.Completion;
        Assert.Equal(Alone(text[..30], false, new SamplingOptions { MaxNewTokens = 60 }), rest.TokenIds);
        Assert.Equal(0, engine.Stats.Running);
    }

    [FixtureFact]
    public void RequestsThatCanNeverRunAreRefusedUpFront()
    {
        using var engine = NewEngine(new EngineOptions { MaxContextTokens = 100 });
        var text = Ids("text_only", "prompt_ids");
        var tooLong = Assert.Throws<InvalidGenerationRequestException>(() => engine.Submit(new GenerationRequest { PromptIds = text, Sampling = new SamplingOptions { MaxNewTokens = 60 } }));
        Assert.Equal("max_tokens", tooLong.Param);
        Assert.Contains("111", tooLong.Message);
        // Image slots without tiles.
        var image = Ids("one_image", "prompt_ids");
        using var wide = NewEngine();
        Assert.Throws<InvalidGenerationRequestException>(() => wide.Submit(new GenerationRequest { PromptIds = image }));
        Assert.Throws<InvalidGenerationRequestException>(() => wide.Submit(new GenerationRequest { PromptIds = text, Sampling = new SamplingOptions { TopP = 0 } }));
    }

    [FixtureFact]
    public void FullQueueRefusesWithBusy()
    {
        using var engine = NewEngine(new EngineOptions { MaxBatch = 1, MaxQueue = 0 });
        var text = Ids("text_only", "prompt_ids");
        var first = engine.Submit(new GenerationRequest { PromptIds = text, Sampling = new SamplingOptions { MaxNewTokens = 300 } });
        Assert.Throws<EngineBusyException>(() => engine.Submit(new GenerationRequest { PromptIds = text }));
        Assert.False(first.Completion.IsFaulted);
    }

    [FixtureFact]
    public async Task CacheBudgetQueuesInsteadOfOverflowing()
    {
        var text = Ids("text_only", "prompt_ids");
        // Room for one request (51 + 20 slots) at a time: the second waits, then runs, and both are right.
        using var engine = NewEngine(new EngineOptions { MaxCacheTokens = 100 });
        var sampling = new SamplingOptions { MaxNewTokens = 20 };
        var a = engine.Submit(new GenerationRequest { PromptIds = text, Sampling = sampling });
        var b = engine.Submit(new GenerationRequest { PromptIds = text[..40], Sampling = sampling });
        var results = await Task.WhenAll(a.Completion, b.Completion);
        Assert.Equal(1, engine.Stats.PeakBatch);
        Assert.Equal(Alone(text, false, sampling), results[0].TokenIds);
        Assert.Equal(Alone(text[..40], false, sampling), results[1].TokenIds);
    }
}
