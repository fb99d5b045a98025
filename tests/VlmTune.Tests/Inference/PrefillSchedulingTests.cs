using VlmTune.Inference;
using VlmTune.Tests.Models;
using VlmTune.Tests.Support;
using static TorchSharp.torch;

namespace VlmTune.Tests.Inference;

/// <summary>
/// The engine's prefill scheduling: prompts prefilled together in one pass, long prompts in chunks between decode
/// steps, and cached prompt prefixes reused. Each must leave every request's tokens equal to its solo run.
/// </summary>
public sealed class PrefillSchedulingTests(TinyModelFixture tiny) : IClassFixture<TinyModelFixture>
{
    private static readonly HashSet<int> Stop = [92542];

    private static int[] Ids(string caseName) => Fixtures.PromptIds(caseName);

    private static Tensor CloverPixels() => Fixtures.GoldenTensors.Read("pixel_values.clot");

    /// <summary>The clover photo's tiles mirrored: another image of the same shape.</summary>
    private static Tensor OtherPixels()
    {
        using var pixels = CloverPixels();
        return pixels.flip(3).contiguous();
    }

    private static int[] Words(int seed, int count)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, count).Select(_ => rng.Next(1000, 90000)).ToArray();
    }

    private InferenceEngine NewEngine(EngineOptions options) => new(tiny.Model, TinyModelFixture.ImageContextId, options);

    /// <summary>What the single-sequence reference generator gives for this prompt.</summary>
    private int[] Alone(IReadOnlyList<int> prompt, Func<Tensor>? pixels, SamplingOptions sampling)
    {
        using var scope = NewDisposeScope();
        Tensor? features = null;
        if (pixels is not null) using (no_grad()) features = tiny.Model.ExtractFeatures(pixels());
        return TokenGenerator.Generate(tiny.Model, prompt, features, TinyModelFixture.ImageContextId, sampling, Stop).TokenIds.ToArray();
    }

    private static GenerationRequest Request(int[] prompt, Func<Tensor>? pixels, int maxNew, IGenerationObserver? observer = null) => new()
    {
        PromptIds = prompt, Pixels = pixels?.Invoke(), Sampling = new SamplingOptions { MaxNewTokens = maxNew }, StopIds = Stop, Observer = observer,
    };

    /// <summary>
    /// Six prompts of 20 to 416 tokens (three with an image) admitted at once go through one prefill pass, left-padded
    /// to the longest, and each answer equals its solo run: padding that sees no key must not poison the real rows.
    /// </summary>
    [FixtureFact]
    public async Task PromptsAdmittedTogetherArePrefilledInOnePass()
    {
        var text = Ids("text_only");
        var image = Ids("one_image");
        var cases = new (int[] Prompt, Func<Tensor>? Pixels)[]
        {
            (text[..20], null), (image, CloverPixels), (text, null), ([.. image, .. Words(1, 100)], OtherPixels), (text[..33], null), (image[..300], CloverPixels),
        };
        var expected = cases.Select(c => Alone(c.Prompt, c.Pixels, new SamplingOptions { MaxNewTokens = 10 })).ToList();

        using var engine = NewEngine(new EngineOptions { MaxPrefillTokens = 1 << 16, PrefixCacheBytes = 0 });
        List<GenerationStream> streams;
        using (engine.HoldAdmission()) streams = cases.Select(c => engine.Submit(Request(c.Prompt, c.Pixels, 10))).ToList();
        var results = await Task.WhenAll(streams.Select(s => s.Completion));
        for (int i = 0; i < cases.Length; i++)
            Assert.True(expected[i].SequenceEqual(results[i].TokenIds), $"request {i}: [{string.Join(",", results[i].TokenIds)}] vs alone [{string.Join(",", expected[i])}]");
        Assert.Equal(1, engine.PrefillPasses);
        Assert.Equal(6, engine.Stats.PeakBatch);
    }

    /// <summary>The token budget splits the admitted prompts into passes of at most rows × longest ≤ budget.</summary>
    [FixtureFact]
    public async Task ThePrefillBudgetBoundsEachPass()
    {
        var text = Ids("text_only");   // 51 tokens
        using var engine = NewEngine(new EngineOptions { MaxPrefillTokens = 110, PrefixCacheBytes = 0 });
        List<GenerationStream> streams;
        using (engine.HoldAdmission()) streams = Enumerable.Range(0, 5).Select(i => engine.Submit(Request(text[..(40 + i)], null, 4))).ToList();
        var results = await Task.WhenAll(streams.Select(s => s.Completion));
        // 2 rows × ≤ 44 tokens fit 110, 3 do not: passes of 2, 2 and 1.
        Assert.Equal(3, engine.PrefillPasses);
        for (int i = 0; i < 5; i++) Assert.Equal(Alone(text[..(40 + i)], null, new SamplingOptions { MaxNewTokens = 4 }), results[i].TokenIds);
    }

    /// <summary>
    /// A prompt longer than the budget is prefilled in chunks (its image's slots cut between chunks), one per loop, and a
    /// running stream gets a token between every two of them; both answers equal their solo runs.
    /// </summary>
    [FixtureFact]
    public async Task LongPromptsArePrefilledInChunksBetweenDecodeSteps()
    {
        var text = Ids("text_only");
        var image = Ids("one_image");                   // 316 tokens, image slots 41..296
        var sampling = new SamplingOptions { MaxNewTokens = 12 };
        var expectedLong = Alone(image, CloverPixels, sampling);
        var expectedRunning = Alone(text, null, new SamplingOptions { MaxNewTokens = 80 });

        using var engine = NewEngine(new EngineOptions { MaxPrefillTokens = 48, PrefixCacheBytes = 0 });
        var gate = new TokenGate(pauseAt: 2);
        var running = engine.Submit(Request(text, null, 80, gate));
        await gate.PausedAsync(running.Completion);

        var observer = new Progress(() => gate.Tokens);
        var passesBefore = engine.PrefillPasses;
        var longOne = engine.Submit(Request(image, CloverPixels, 12, observer));
        gate.Resume();
        var result = await longOne.Completion;
        Assert.Equal(expectedLong, result.TokenIds);
        Assert.Equal(7, engine.PrefillPasses - passesBefore);            // ⌈316 / 48⌉
        // A decode step of the running request after each of the first six chunks.
        Assert.True(observer.TokensAtPrefilled - observer.TokensAtAdmission >= 6,
            $"the running stream got {observer.TokensAtPrefilled - observer.TokensAtAdmission} tokens while the long prompt was prefilled in 7 chunks");
        Assert.Equal(expectedRunning, (await running.Completion).TokenIds);
    }

    /// <summary>
    /// A short prompt arriving while a stream decodes waits exactly MaxWaitingSteps decode steps for its prefill pass
    /// (so that passes are fewer and fuller), and none with 0; a prompt of half a budget or more never waits.
    /// </summary>
    [FixtureTheory]
    [InlineData(0, 20, 0)]
    [InlineData(5, 20, 5)]
    [InlineData(5, 300, 0)]   // 300 tokens ≥ half of the 512-token budget
    public async Task ShortPromptsWaitAFewDecodeStepsForAFullerPass(int maxWaitingSteps, int promptLength, int expectedSteps)
    {
        var text = Ids("text_only");
        using var engine = NewEngine(new EngineOptions { MaxPrefillTokens = 512, MaxWaitingSteps = maxWaitingSteps, PrefixCacheBytes = 0 });
        var gate = new TokenGate(pauseAt: 2);
        var running = engine.Submit(Request(text, null, 60, gate));
        await gate.PausedAsync(running.Completion);
        var observer = new Progress(() => gate.Tokens);
        int[] prompt = [.. text[..10], .. Words(14, promptLength - 10)];
        var lateStream = engine.Submit(Request(prompt, null, 4, observer));
        gate.Resume();
        var late = await lateStream.Completion;
        Assert.Equal(expectedSteps, observer.TokensAtPrefilled - observer.TokensAtAdmission);
        Assert.Equal(Alone(prompt, null, new SamplingOptions { MaxNewTokens = 4 }), late.TokenIds);
        await running.Completion;
    }

    /// <summary>
    /// A shorter prompt joins a running batch in a spare row of its cache, and rows leave by moving the last row into
    /// their place: the batch cache is built once, and every answer equals its solo run.
    /// </summary>
    [FixtureFact]
    public async Task ShorterPromptsJoinTheRunningBatchInPlace()
    {
        var text = Ids("text_only");
        using var engine = NewEngine(new EngineOptions { PrefixCacheBytes = 0, MaxWaitingSteps = 0 });
        var gate = new TokenGate(pauseAt: 3);
        var first = engine.Submit(Request(text, null, 60, gate));
        await gate.PausedAsync(first.Completion);
        var joined = new[] { text[..20], text[..33], text[..45] }.Select(p => (Prompt: p, Stream: engine.Submit(Request(p, null, 8)))).ToList();
        gate.Resume();
        foreach (var (prompt, stream) in joined)
            Assert.Equal(Alone(prompt, null, new SamplingOptions { MaxNewTokens = 8 }), (await stream.Completion).TokenIds);
        Assert.Equal(Alone(text, null, new SamplingOptions { MaxNewTokens = 60 }), (await first.Completion).TokenIds);
        Assert.True(engine.Stats.PeakBatch >= 2, $"peak batch {engine.Stats.PeakBatch}");
        Assert.Equal(1, engine.BatchRebuilds);
    }

    /// <summary>Reads another stream's progress when a request is admitted and when its prefill ends.</summary>
    private sealed class Progress(Func<int> tokensOfOther) : IGenerationObserver
    {
        public int TokensAtAdmission { get; private set; }
        public int TokensAtPrefilled { get; private set; }
        public void Admitted() => TokensAtAdmission = tokensOfOther();
        public void TilesEncoded(int tiles) { }
        public void Prefilled(int tokens) => TokensAtPrefilled = tokensOfOther();
        public void Token() { }
    }

    /// <summary>
    /// A prompt that starts like an earlier one (the same image and question, another follow-up) reuses the cached
    /// blocks: its image is not encoded again when they cover its slots, and its answer equals a cache-free run.
    /// </summary>
    [FixtureFact]
    public async Task ASharedPrefixIsReusedAndChangesNothing()
    {
        var image = Ids("one_image");                   // image slots 41..296
        int[] first = [.. image, .. Words(2, 100)], second = [.. image, .. Words(2, 90), .. Words(3, 30)];   // 416 / 436 tokens, equal for 406
        var sampling = new SamplingOptions { MaxNewTokens = 10 };

        using var engine = NewEngine(new EngineOptions { ImageCacheBytes = 64L << 20 });
        var a = await engine.GenerateAsync(Request(first, CloverPixels, 10));
        var b = await engine.GenerateAsync(Request(second, CloverPixels, 10));
        Assert.Equal(Alone(first, CloverPixels, sampling), a.TokenIds);
        Assert.Equal(Alone(second, CloverPixels, sampling), b.TokenIds);

        var stats = engine.PrefixCache;
        Assert.Equal(1, stats.Hits);
        Assert.Equal(1, stats.Misses);
        Assert.Equal(384, stats.ReusedTokens);          // 6 blocks of 64: the 7th differs (tokens 384..447)
        Assert.Equal(6, stats.Blocks);                  // the first prompt's 6 full blocks: the second's are the same
        // The second prompt's image slots all lie in the reused blocks: no vision pass, not even an image-cache lookup.
        Assert.Equal(new ImageCacheStats(0, 1, engine.ImageCache.Bytes, 1, 0, 64L << 20), engine.ImageCache);
    }

    /// <summary>
    /// A row with a cached prefix batched with a longer uncached prompt takes its cached tail as input again: fine for
    /// text (one pass), but not where that tail holds image slots whose features it never computed (its cached prefix
    /// covered the image): then the two go in separate passes. Answers equal their solo runs either way.
    /// </summary>
    [FixtureFact]
    public async Task ACachedRowRecomputesItsTailOnlyWhereItCan()
    {
        var text = Ids("text_only");
        var image = Ids("one_image");                   // image slots 41..296
        var sampling = new SamplingOptions { MaxNewTokens = 6 };
        using var engine = NewEngine(new EngineOptions());

        int[] textFirst = [.. text, .. Words(8, 100)], textAgain = [.. textFirst[..128], .. Words(9, 40)], other = Words(10, 100);
        await engine.GenerateAsync(Request(textFirst, null, 6));                     // caches blocks 0, 1
        long before = engine.PrefillPasses;
        List<GenerationStream> streams;
        using (engine.HoldAdmission()) streams = [engine.Submit(Request(textAgain, null, 6)), engine.Submit(Request(other, null, 6))];
        var results = await Task.WhenAll(streams.Select(x => x.Completion));
        Assert.Equal(1, engine.PrefillPasses - before);                                 // 40 left, recomputes 60 cached text tokens
        Assert.Equal(Alone(textAgain, null, sampling), results[0].TokenIds);
        Assert.Equal(Alone(other, null, sampling), results[1].TokenIds);

        int[] imageFirst = [.. image, .. Words(11, 100)], imageAgain = [.. imageFirst[..384], .. Words(12, 40)], longer = Words(13, 200);
        await engine.GenerateAsync(Request(imageFirst, CloverPixels, 6));            // caches blocks 0..5, the image's slots
        before = engine.PrefillPasses;
        using (engine.HoldAdmission()) streams = [engine.Submit(Request(imageAgain, CloverPixels, 6)), engine.Submit(Request(longer, null, 6))];
        results = await Task.WhenAll(streams.Select(x => x.Completion));
        Assert.Equal(2, engine.PrefillPasses - before);                                 // recomputing from 224 would need the features
        Assert.Equal(Alone(imageAgain, CloverPixels, sampling), results[0].TokenIds);
        Assert.Equal(Alone(longer, null, sampling), results[1].TokenIds);
    }

    /// <summary>The same tokens with another image, or under an adapter-free engine given other image bytes, reuse only the blocks before the image.</summary>
    [FixtureFact]
    public async Task ADifferentImageReusesOnlyTheTextBeforeIt()
    {
        var image = Ids("one_image");                   // image slots from 41: block 0 holds text and slots
        int[] prompt = [.. Words(4, 70), .. image, .. Words(5, 20)];   // slots from 111: blocks 0 (text only) and 1.. (slots)
        var sampling = new SamplingOptions { MaxNewTokens = 8 };
        using var engine = NewEngine(new EngineOptions());
        var a = await engine.GenerateAsync(Request(prompt, CloverPixels, 8));
        var b = await engine.GenerateAsync(Request(prompt, OtherPixels, 8));
        Assert.Equal(Alone(prompt, CloverPixels, sampling), a.TokenIds);
        Assert.Equal(Alone(prompt, OtherPixels, sampling), b.TokenIds);
        Assert.Equal(64, engine.PrefixCache.ReusedTokens);   // block 0 only: block 1 holds the other image's slots
    }

    /// <summary>
    /// A budget of three blocks: a prompt keeps its first three (a later equal prompt reuses them), another prompt
    /// evicts them for its own, and every answer stays right.
    /// </summary>
    [FixtureFact]
    public async Task ThePrefixCacheStaysWithinItsBudget()
    {
        var c = tiny.Model.Config.Llm;
        long element = tiny.Model.language_model.TokenEmbedding.weight!.ElementSize;
        long blockBytes = 2L * c.NumHiddenLayers * c.NumKeyValueHeads * PromptBlocksSize * c.HeadDim * element;
        var text = Ids("text_only");
        int[] a = [.. text, .. Words(6, 300)], b = [.. text[..10], .. Words(7, 341)];   // 351 tokens each: 5 full blocks
        using var engine = NewEngine(new EngineOptions { PrefixCacheBytes = 3 * blockBytes });
        var sampling = new SamplingOptions { MaxNewTokens = 6 };
        var expectedA = Alone(a, null, sampling);
        var expectedB = Alone(b, null, sampling);

        Assert.Equal(expectedA, (await engine.GenerateAsync(Request(a, null, 6))).TokenIds);
        Assert.Equal(expectedA, (await engine.GenerateAsync(Request(a, null, 6))).TokenIds);
        Assert.Equal((192L, 3, 0L), (engine.PrefixCache.ReusedTokens, engine.PrefixCache.Blocks, engine.PrefixCache.Evictions));

        Assert.Equal(expectedB, (await engine.GenerateAsync(Request(b, null, 6))).TokenIds);
        Assert.Equal(expectedB, (await engine.GenerateAsync(Request(b, null, 6))).TokenIds);
        var stats = engine.PrefixCache;
        Assert.Equal((384L, 3, 3L), (stats.ReusedTokens, stats.Blocks, stats.Evictions));
        Assert.True(stats.Bytes <= 3 * blockBytes, $"{stats}");
        Assert.Equal(expectedA, (await engine.GenerateAsync(Request(a, null, 6))).TokenIds);   // evicted: computed again, still right
    }

    private const int PromptBlocksSize = 64;
}
