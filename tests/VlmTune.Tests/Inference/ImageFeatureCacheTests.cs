using VlmTune.Checkpoints;
using VlmTune.Inference;
using VlmTune.Models;
using VlmTune.Tests.Models;
using VlmTune.Tests.Support;
using static TorchSharp.torch;

namespace VlmTune.Tests.Inference;

/// <summary>
/// The engine's image-feature cache: an image seen before skips the ViT and projector (the counters say which ran),
/// answers equal a cache-off engine's, the budget holds, and features of another vision adapter are never shared.
/// </summary>
public sealed class ImageFeatureCacheTests(TinyModelFixture tiny) : IClassFixture<TinyModelFixture>
{
    private static readonly HashSet<int> Stop = [92542];
    private static readonly SamplingOptions Greedy = new() { MaxNewTokens = 8 };

    private static int[] OneImagePrompt() => Fixtures.PromptIds("one_image");

    private static Tensor Clot() => Fixtures.GoldenTensors.Read("pixel_values.clot");

    /// <summary>Another image with clot's tiling: the tiles mirrored left to right.</summary>
    private static Tensor Mirrored() { using var clot = Clot(); return clot.flip(3); }

    private static long Tiles() { using var clot = Clot(); return clot.shape[0]; }

    /// <summary>The one-image prompt with its run of image-context ids repeated <paramref name="images"/> times (one run per image).</summary>
    private static int[] Prompt(int images)
    {
        var ids = OneImagePrompt();
        int first = Array.IndexOf(ids, TinyModelFixture.ImageContextId), last = Array.LastIndexOf(ids, TinyModelFixture.ImageContextId);
        var run = ids[first..(last + 1)];
        return [.. ids[..first], .. Enumerable.Repeat(run, images).SelectMany(r => r), .. ids[(last + 1)..]];
    }

    private static GenerationRequest Request(params Func<Tensor>[] images)
    {
        var tiles = images.Select(i => i()).ToArray();
        var pixels = cat(tiles, 0);
        foreach (var t in tiles) t.Dispose();
        return new GenerationRequest
        {
            PromptIds = Prompt(images.Length), Pixels = pixels, ImageTiles = [.. Enumerable.Repeat((int)Tiles(), images.Length)],
            Sampling = Greedy, StopIds = Stop,
        };
    }

    private InferenceEngine Engine(long? cacheBytes) => new(tiny.Model, TinyModelFixture.ImageContextId, new EngineOptions { ImageCacheBytes = cacheBytes });

    /// <summary>Bytes the cache holds for one image of clot's tiling: (tiles, 256, D) in fp32.</summary>
    private long OneImageBytes() => Tiles() * tiny.Model.Config.NumImageToken * tiny.Model.Config.Llm.HiddenSize * sizeof(float);

    private static async Task<int[]> Answer(InferenceEngine engine, GenerationRequest request) => (await engine.GenerateAsync(request)).TokenIds.ToArray();

    /// <summary>What a cache-off engine answers for each request (built fresh for every call).</summary>
    private async Task<int[][]> Uncached(params Func<GenerationRequest>[] requests)
    {
        using var off = Engine(0);
        var answers = new List<int[]>();
        foreach (var r in requests) answers.Add(await Answer(off, r()));
        Assert.Equal(default, off.ImageCache);   // off: nothing counted, capacity 0
        return [.. answers];
    }

    [FixtureFact]
    public async Task TheSameImageTwiceRunsTheVisionPassOnce()
    {
        var expected = await Uncached(() => Request(Clot));
        using var engine = Engine(null);
        Assert.Equal(64L << 20, engine.ImageCache.CapacityBytes);   // the CPU default

        Assert.Equal(expected[0], await Answer(engine, Request(Clot)));
        Assert.Equal((0L, 1L, OneImageBytes(), 1), (engine.ImageCache.Hits, engine.ImageCache.Misses, engine.ImageCache.Bytes, engine.ImageCache.Entries));
        Assert.Equal(expected[0], await Answer(engine, Request(Clot)));
        Assert.Equal((1L, 1L, OneImageBytes(), 1), (engine.ImageCache.Hits, engine.ImageCache.Misses, engine.ImageCache.Bytes, engine.ImageCache.Entries));

        // The cache owns its tensors: disposing the engine frees them.
        engine.Dispose();
        Assert.Equal((0L, 0), (engine.ImageCache.Bytes, engine.ImageCache.Entries));
    }

    /// <summary>What the cache holds for an image is exactly what the vision encoder and projector give for it.</summary>
    [FixtureFact]
    public async Task CachedFeaturesEqualADirectVisionPass()
    {
        using var engine = Engine(null);
        await Answer(engine, Request(Clot));
        using var scope = NewDisposeScope();
        var clot = Clot();
        Tensor direct;
        using (no_grad()) direct = tiny.Model.ExtractFeatures(clot);                            // (tiles, 256, D)
        var cached = engine.FeatureCache!.Find(ImageKey.Of(clot, vision: 0));
        Assert.NotNull(cached);
        Assert.Equal(direct.shape, cached.shape);
        Assert.Equal(direct.dtype, cached.dtype);
        Assert.True(direct.equal(cached).all().item<bool>(), "the cached features differ from a direct pass");
    }

    [FixtureFact]
    public async Task DifferentImagesAreTwoMisses()
    {
        var expected = await Uncached(() => Request(Clot), () => Request(Mirrored));
        Assert.NotEqual(expected[0], expected[1]);   // otherwise a wrongly shared entry could pass unseen
        using var engine = Engine(null);
        Assert.Equal(expected[0], await Answer(engine, Request(Clot)));
        Assert.Equal(expected[1], await Answer(engine, Request(Mirrored)));
        Assert.Equal((0L, 2L, 2 * OneImageBytes(), 2), (engine.ImageCache.Hits, engine.ImageCache.Misses, engine.ImageCache.Bytes, engine.ImageCache.Entries));
    }

    /// <summary>A request's images are cached one by one (ImageTiles), so another request with one of them, in any order, reuses it.</summary>
    [FixtureFact]
    public async Task EachImageOfARequestIsCachedOnItsOwn()
    {
        var expected = await Uncached(() => Request(Clot, Mirrored), () => Request(Mirrored), () => Request(Mirrored, Clot));
        using var engine = Engine(null);
        Assert.Equal(expected[0], await Answer(engine, Request(Clot, Mirrored)));
        Assert.Equal((0L, 2L), (engine.ImageCache.Hits, engine.ImageCache.Misses));
        Assert.Equal(expected[1], await Answer(engine, Request(Mirrored)));
        Assert.Equal(expected[2], await Answer(engine, Request(Mirrored, Clot)));
        Assert.Equal((3L, 2L, 2), (engine.ImageCache.Hits, engine.ImageCache.Misses, engine.ImageCache.Entries));
    }

    /// <summary>Requests admitted together with the same image: one vision pass encodes it once for both.</summary>
    [FixtureFact]
    public async Task EqualImagesAdmittedTogetherAreEncodedOnce()
    {
        var expected = await Uncached(() => Request(Clot));
        using var engine = Engine(null);
        List<GenerationStream> streams;
        using (engine.HoldAdmission()) streams = [engine.Submit(Request(Clot)), engine.Submit(Request(Clot))];
        foreach (var s in streams) Assert.Equal(expected[0], (await s.Completion).TokenIds);
        Assert.Equal((1L, 1L, 1), (engine.ImageCache.Hits, engine.ImageCache.Misses, engine.ImageCache.Entries));
    }

    /// <summary>A budget of one image: the least recently used one goes, the bytes stay within it, the answers stay the same.</summary>
    [FixtureFact]
    public async Task EvictionKeepsTheBudgetAndTheAnswers()
    {
        var expected = await Uncached(() => Request(Clot), () => Request(Mirrored));
        long budget = OneImageBytes() + 1;
        using var engine = Engine(budget);
        foreach (var (image, answer) in new (Func<Tensor>, int[])[] { (Clot, expected[0]), (Mirrored, expected[1]), (Clot, expected[0]), (Clot, expected[0]) })
        {
            Assert.Equal(answer, await Answer(engine, Request(image)));
            Assert.InRange(engine.ImageCache.Bytes, 0, budget);
        }
        // clot, mirrored (evicts clot), clot again (evicts mirrored): three misses; the last clot is a hit.
        Assert.Equal((1L, 3L, 2L, 1), (engine.ImageCache.Hits, engine.ImageCache.Misses, engine.ImageCache.Evictions, engine.ImageCache.Entries));

        // A budget below one image caches nothing and still answers.
        using var small = Engine(OneImageBytes() - 1);
        Assert.Equal(expected[0], await Answer(small, Request(Clot)));
        Assert.Equal(expected[0], await Answer(small, Request(Clot)));
        Assert.Equal((0L, 2L, 0L, 0), (small.ImageCache.Hits, small.ImageCache.Misses, small.ImageCache.Bytes, small.ImageCache.Entries));
    }

    [FixtureFact]
    public async Task CacheOffCountsNothing()
    {
        using var engine = Engine(0);
        var first = await Answer(engine, Request(Clot));
        Assert.Equal(first, await Answer(engine, Request(Clot)));
        Assert.Equal(default, engine.ImageCache);
    }

    [FixtureFact]
    public void BadTileCountsAndBudgetsAreRefused()
    {
        using var engine = Engine(null);
        var request = Request(Clot) with { ImageTiles = [(int)Tiles() - 1] };
        var e = Assert.Throws<InvalidGenerationRequestException>(() => engine.Submit(request));
        Assert.Equal("messages", e.Param);
        request.Pixels!.Dispose();
        Assert.Throws<VlmTuneException>(() => Engine(-1));
    }
}

/// <summary>Vision LoRA changes an image's features: the cache keeps them apart per adapter, and shares the base's with LLM-only adapters.</summary>
[Collection(MultiAdapterCollection.Name)]
public sealed class ImageFeatureCacheAdapterTests(MultiAdapterFixture f)
{
    [FixtureFact]
    public async Task AdaptersWithVisionLoraDoNotShareFeatures()
    {
        using var model = InternVLModelLoader.Load(Fixtures.TinyModel, new ModelOptions());
        var adapters = new ServedAdapters(model, "tiny");
        var alpha = adapters.Load("alpha", f.Alpha);        // LLM LoRA only: the base's image features
        var beta = adapters.Load("beta", f.Beta);           // LoRA on the ViT too
        var beta2 = adapters.Load("beta2", f.Beta);         // the same weights under another name: another adapter
        using var engine = new InferenceEngine(model, MultiAdapterFixture.ImageContextId, adapters: adapters);

        var steps = new (ServedAdapter? Adapter, string? Dir, long Hits, long Misses)[]
        {
            (null, null, 0, 1), (alpha, f.Alpha, 1, 1), (beta, f.Beta, 1, 2), (beta2, f.Beta, 1, 3), (beta, f.Beta, 2, 3),
        };
        foreach (var (adapter, dir, hits, misses) in steps)
        {
            var result = await engine.GenerateAsync(new GenerationRequest
            {
                PromptIds = f.ImagePrompt, Pixels = MultiAdapterFixture.Pixels(), ImageTiles = null,
                Sampling = MultiAdapterFixture.Greedy, StopIds = MultiAdapterFixture.NoStop, Adapter = adapter,
            });
            Assert.Equal(f.Merged[(dir, true)], result.TokenIds);
            Assert.Equal((hits, misses), (engine.ImageCache.Hits, engine.ImageCache.Misses));
        }
        Assert.Equal(3, engine.ImageCache.Entries);   // the base's (shared with alpha), beta's, beta2's
    }
}

/// <summary>The cache and its key on their own: LRU by bytes, ownership of the tensors, what makes two keys equal.</summary>
public sealed class ImageFeatureCacheUnitTests
{
    private static ImageKey Key(int n) => new((ulong)n, 0, 0, 0, 0);

    [Fact]
    public void EvictsLeastRecentlyUsedAndFreesWhatItDrops()
    {
        var cache = new ImageFeatureCache(capacityBytes: 3 * 16);                    // three (4) fp32 tensors
        var t = Enumerable.Range(0, 4).Select(_ => ones(4)).ToArray();
        for (int i = 0; i < 3; i++) Assert.True(cache.Add(Key(i), t[i]));
        Assert.Same(t[0], cache.Find(Key(0)));                                        // 0 is now the most recent: 1 goes next
        Assert.True(cache.Add(Key(3), t[3]));
        Assert.Null(cache.Find(Key(1)));
        Assert.True(t[1].IsInvalid, "an evicted tensor was not freed");
        Assert.Equal((48L, 3, 1L), (cache.Stats.Bytes, cache.Stats.Entries, cache.Stats.Evictions));

        // Too large for the budget, or a key held already: not taken, the caller keeps it.
        using var big = ones(13);
        Assert.False(cache.Add(Key(9), big));
        using var again = ones(4);
        Assert.False(cache.Add(Key(3), again));
        Assert.False(big.IsInvalid || again.IsInvalid);

        cache.Dispose();
        Assert.All(new[] { t[0], t[2], t[3] }, x => Assert.True(x.IsInvalid, "dispose left a cached tensor alive"));
        Assert.Equal((0L, 0), (cache.Stats.Bytes, cache.Stats.Entries));
    }

    [Fact]
    public void KeysFollowTheBytesDtypeShapeAndVisionAdapter()
    {
        using var scope = NewDisposeScope();
        var a = arange(2 * 3 * 4 * 4, dtype: ScalarType.Float32).view(2, 3, 4, 4);
        Assert.Equal(ImageKey.Of(a, 0), ImageKey.Of(a.clone(), 0));
        Assert.NotEqual(ImageKey.Of(a, 0), ImageKey.Of(a, 7));                          // another vision adapter
        Assert.NotEqual(ImageKey.Of(a, 0), ImageKey.Of(a.to_type(ScalarType.BFloat16), 0));
        Assert.NotEqual(ImageKey.Of(a, 0), ImageKey.Of(a.view(1, 6, 4, 4), 0));           // same bytes, another tiling
        var b = a.clone();
        b[1, 2, 3, 3] = tensor(-1f);
        Assert.NotEqual(ImageKey.Of(a, 0), ImageKey.Of(b, 0));                              // one value differs
        // A request's second image is a view at an offset: it hashes as that image alone.
        Assert.Equal(ImageKey.Of(a[1..].clone(), 0), ImageKey.Of(a.narrow(0, 1, 1), 0));
        Assert.NotEqual(ImageKey.Of(a.narrow(0, 0, 1), 0), ImageKey.Of(a.narrow(0, 1, 1), 0));
        // Not contiguous: hashed as its values in order.
        var t = a.transpose(2, 3);
        Assert.Equal(ImageKey.Of(t.contiguous(), 0), ImageKey.Of(t, 0));
    }
}
