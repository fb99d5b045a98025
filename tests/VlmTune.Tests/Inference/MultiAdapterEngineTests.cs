using VlmTune.Checkpoints;
using VlmTune.Inference;
using VlmTune.Models;
using VlmTune.Tests.Support;
using static TorchSharp.torch;

namespace VlmTune.Tests.Inference;

/// <summary>
/// Two adapters beside the tiny base: "alpha" is the fixture's PEFT adapter (r 8, alpha 16, the five InternLM2
/// targets); "beta" a random one of another rank and alpha on other layers (wqkv, w2 and the output head) with a ViT
/// LoRA too. The expected answers come from each adapter applied as `vlmtune chat --adapter` applies it (unmerged
/// branches in the model) and merged into the weights, decoded alone by the reference generator.
/// </summary>
public sealed class MultiAdapterFixture : IDisposable
{
    public const int ImageContextId = 92546;
    public static readonly SamplingOptions Greedy = new() { MaxNewTokens = 12 };
    // No stop ids: every answer runs its 12 tokens, so all rows share every decode step.
    public static readonly IReadOnlySet<int> NoStop = new HashSet<int>();

    public string Dir { get; } = Directory.CreateTempSubdirectory("vlmtune-multilora-").FullName;
    public string Alpha => Fixtures.Adapter;
    public string Beta { get; }
    public string BetaTextOnly { get; }

    public int[] TextPrompt { get; } = Ids("text_only");
    public int[] ImagePrompt { get; } = Ids("one_image");
    public static Tensor Pixels() => Fixtures.GoldenTensors.Read("pixel_values.clot");

    /// <summary>Expected greedy ids by (adapter folder or null for the base, image prompt?).</summary>
    public Dictionary<(string?, bool), int[]> Unmerged { get; } = [];
    public Dictionary<(string?, bool), int[]> Merged { get; } = [];

    public MultiAdapterFixture()
    {
        Beta = AdapterFolders.Write(Path.Combine(Dir, "beta"), seed: 11, r: 4, alpha: 8, ["attention.wqkv", "feed_forward.w2", "output"], visionTargets: ["attn.qkv", "mlp.fc2"]);
        BetaTextOnly = Path.Combine(Dir, "beta-text");
        Directory.CreateDirectory(BetaTextOnly);
        foreach (var f in Directory.GetFiles(Beta)) File.Copy(f, Path.Combine(BetaTextOnly, Path.GetFileName(f)));
        foreach (var adapter in new[] { null, Alpha, Beta, BetaTextOnly })
            foreach (bool merge in new[] { false, true })
            {
                if (adapter is null && merge) continue;
                using var chat = InternVLChat.Load(Fixtures.TinyModel, new ChatLoadOptions { AdapterDir = adapter, MergeAdapter = merge });
                foreach (bool image in new[] { false, true })
                {
                    var ids = Alone(chat.Model, image);
                    (merge ? Merged : Unmerged)[(adapter, image)] = ids;
                    if (adapter is null) Merged[(adapter, image)] = ids;   // the base is both
                }
            }
    }

    private int[] Alone(InternVLChatModel model, bool image)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var features = image ? model.ExtractFeatures(Pixels()) : null;
        return TokenGenerator.Generate(model, image ? ImagePrompt : TextPrompt, features, ImageContextId, Greedy, NoStop).TokenIds.ToArray();
    }

    private static int[] Ids(string caseName) => Fixtures.PromptIds(caseName);

    public void Dispose() => Directory.Delete(Dir, true);
}

/// <summary>The engine tests and the HTTP tests share the adapters and their expected answers (computed once).</summary>
[CollectionDefinition(Name)]
public sealed class MultiAdapterCollection : ICollectionFixture<MultiAdapterFixture>
{
    public const string Name = "Multi-adapter serving";
}

[Collection(MultiAdapterCollection.Name)]
public sealed class MultiAdapterEngineTests(MultiAdapterFixture f)
{
    private static InternVLChatModel LoadBase() => InternVLModelLoader.Load(Fixtures.TinyModel, new ModelOptions());

    private GenerationRequest Request(ServedAdapter? adapter, bool image) => new()
    {
        PromptIds = image ? f.ImagePrompt : f.TextPrompt, Pixels = image ? MultiAdapterFixture.Pixels() : null,
        Sampling = MultiAdapterFixture.Greedy, StopIds = MultiAdapterFixture.NoStop, Adapter = adapter,
    };

    [FixtureFact]
    public void TheAdaptersChangeTheAnswers()
    {
        // Otherwise the tests below could not tell an adapter's rows from the base's.
        foreach (bool image in new[] { false, true })
        {
            Assert.NotEqual(f.Merged[(null, image)], f.Merged[(f.Alpha, image)]);
            Assert.NotEqual(f.Merged[(null, image)], f.Merged[(f.Beta, image)]);
            Assert.NotEqual(f.Merged[(f.Alpha, image)], f.Merged[(f.Beta, image)]);
        }
        // beta's ViT LoRA changes what the image request answers.
        Assert.NotEqual(f.Merged[(f.BetaTextOnly, true)], f.Merged[(f.Beta, true)]);
        // chat --adapter (unmerged branches) and the merged weights agree: fp32 rounding does not change a greedy token here.
        foreach (var key in f.Unmerged.Keys) Assert.Equal(f.Merged[key], f.Unmerged[key]);
    }

    /// <summary>
    /// Requests for alpha, beta and the base, with and without an image, admitted together into one batch: each
    /// answer equals that model's answer alone (unmerged and merged), and equals the same request run alone here.
    /// </summary>
    [FixtureFact]
    public async Task RequestsForDifferentAdaptersShareOneBatchAndEqualTheirSoloAnswers()
    {
        using var model = LoadBase();
        var adapters = new ServedAdapters(model, "tiny");
        var alpha = adapters.Load("alpha", f.Alpha);
        var beta = adapters.Load("beta", f.Beta);
        using var engine = new InferenceEngine(model, MultiAdapterFixture.ImageContextId, adapters: adapters);
        var models = new (ServedAdapter? Adapter, string? Dir)[] { (alpha, f.Alpha), (null, null), (beta, f.Beta) };
        var cases = models.SelectMany(m => new[] { (m.Adapter, m.Dir, Image: false), (m.Adapter, m.Dir, Image: true) }).ToList();

        List<GenerationStream> streams;
        using (engine.HoldAdmission()) streams = cases.Select(c => engine.Submit(Request(c.Adapter, c.Image))).ToList();
        var batched = await Task.WhenAll(streams.Select(s => s.Completion));

        Assert.NotNull(engine.FusedDecodeOffReason);   // on CUDA the kernels (base weights only) are not used
        Assert.Equal(cases.Count, engine.Stats.PeakBatch);
        Assert.Equal(3, adapters.PeakModelsInBatch);   // alpha, beta and the base decoded in one step
        for (int i = 0; i < cases.Count; i++)
        {
            var (adapter, dir, image) = cases[i];
            string what = $"{adapter?.Name ?? "base"}{(image ? " with image" : "")}";
            Assert.True(f.Merged[(dir, image)].SequenceEqual(batched[i].TokenIds), $"{what}: batched [{string.Join(",", batched[i].TokenIds)}] vs merged [{string.Join(",", f.Merged[(dir, image)])}]");
            Assert.True(f.Unmerged[(dir, image)].SequenceEqual(batched[i].TokenIds), $"{what}: batched differs from chat --adapter");
            var alone = await engine.GenerateAsync(Request(adapter, image));
            Assert.True(alone.TokenIds.SequenceEqual(batched[i].TokenIds), $"{what}: batched differs from the same request alone");
        }
        // Each image request run alone reused the blocks its own model's batched run cached (the same tokens under
        // another adapter are other keys and values: a shared block would have given another answer above).
        Assert.Equal(3, engine.PrefixCache.Hits);
        Assert.Equal(0, alpha.Running + beta.Running);
    }

    /// <summary>Unloading an adapter with a running request: the name goes at once, the request finishes with it, the weights go after.</summary>
    [FixtureFact]
    public async Task UnloadingDrainsRunningRequestsAndRefusesNewOnes()
    {
        using var model = LoadBase();
        var adapters = new ServedAdapters(model, "tiny");
        var beta = adapters.Load("beta", f.Beta);
        using var engine = new InferenceEngine(model, MultiAdapterFixture.ImageContextId, adapters: adapters);
        var running = engine.Submit(Request(beta, image: false));
        var other = engine.Submit(Request(null, image: false));
        await foreach (var _ in running.ReadTokensAsync()) break;   // decoding now

        var gone = adapters.Unload("beta");
        Assert.Same(beta, gone);
        Assert.Null(adapters.Find("beta"));
        // Loading another adapter meanwhile touches nothing the running requests read.
        var alpha = adapters.Load("alpha", f.Alpha);
        Assert.Throws<UnknownModelException>(() => engine.Submit(Request(beta, image: false)));

        Assert.Equal(f.Merged[(f.Beta, false)], (await running.Completion).TokenIds);
        Assert.Equal(f.Merged[(null, false)], (await other.Completion).TokenIds);
        Assert.True(beta.Released, "the unloaded adapter's weights outlived its last request");
        Assert.Throws<UnknownModelException>(() => adapters.Unload("beta"));
        // The engine owns its adapters: disposing it frees the rest.
        engine.Dispose();
        Assert.True(alpha.Released);
    }

    [FixtureFact]
    public void BadAdaptersAreRefusedNamingWhy()
    {
        using var model = LoadBase();
        using var adapters = new ServedAdapters(model, "tiny");
        var bad = Assert.Throws<InvalidAdapterException>(() => adapters.Load("bad name", f.Alpha));
        Assert.Equal("name", bad.Param);
        Assert.Throws<AdapterConflictException>(() => adapters.Load("tiny", f.Alpha));
        adapters.Load("alpha", f.Alpha);
        Assert.Throws<AdapterConflictException>(() => adapters.Load("alpha", f.Beta));

        // Trained non-LoRA weights would replace the base's for every request: refused, saying which and why.
        var projector = AdapterFolders.WithTrainedProjector(f.Alpha, Path.Combine(f.Dir, "engine-with-projector"));
        var e = Assert.Throws<InvalidAdapterException>(() => adapters.Load("proj", projector));
        Assert.Equal("path", e.Param);
        Assert.Contains("adapter 'proj'", e.Message);
        Assert.Contains("trainable.safetensors: mlp1", e.Message);
        Assert.DoesNotContain("\n", e.Message);
        // A folder that is no adapter, one that does not fit: AdapterCheckpoint's own checks.
        Assert.Equal("path", Assert.Throws<InvalidAdapterException>(() => adapters.Load("empty", f.Dir)).Param);
        Assert.Null(adapters.Find("proj"));
        Assert.Equal(["alpha"], adapters.All.Select(a => a.Name));

        // A base that has LoRA branches of its own cannot be shared.
        PeftAdapter.Load(model.language_model, f.Alpha);
        Assert.Throws<VlmTuneException>(() => new ServedAdapters(model, "tiny"));
    }

    /// <summary>Adapters of one engine's model do not run on another's.</summary>
    [FixtureFact]
    public void AnAdapterOfAnotherEngineIsRefused()
    {
        using var model = LoadBase();
        using var adapters = new ServedAdapters(model, "tiny");
        var alpha = adapters.Load("alpha", f.Alpha);
        using var plain = new InferenceEngine(model, MultiAdapterFixture.ImageContextId);
        Assert.Throws<UnknownModelException>(() => plain.Submit(Request(alpha, image: false)));
        Assert.Equal(0, alpha.Running);
    }
}
