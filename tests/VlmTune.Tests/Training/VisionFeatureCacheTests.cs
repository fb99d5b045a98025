using System.Text.Json;
using VlmTune.Checkpoints;
using VlmTune.Models;
using VlmTune.Tests.Support;
using VlmTune.Training;
using VlmTune.Vision;
using static TorchSharp.torch;
using VlmTune.Data;

namespace VlmTune.Tests.Training;

/// <summary>cache_vision_features: frozen ViT outputs stored on disk and reused across epochs and runs (tiny model, CPU, fp32).</summary>
[Collection(GlobalTorchRng.Name)]
public sealed class VisionFeatureCacheTests
{
    // 6 samples (4 with images: tiny.png twice, clot.jpg twice; 2 text-only), batch 2: 3 iterations per epoch.
    private static readonly string[] TwoEpochs = ["max_steps=null", "max_epochs=2", "dataloader_num_workers=0", "lora_dropout=0.1", "lr=0.01"];

    private sealed record Run(List<double> Losses, Dictionary<string, Tensor> Trained, long TowerTilesAtEpochEnd, long DecodedAtEpochEnd,
        long TowerTiles, long Decoded, VisionFeatureCache? Cache, TrainResult Result);

    private static Run Train(TrainTestData data, string[] settings, TrainerOptions? options = null, CancellationToken cancel = default)
    {
        long tilesAt = -1, decodedAt = -1;
        Trainer? self = null;
        var progress = options?.Progress;
        using var trainer = new Trainer(data.Config(settings), (options ?? new TrainerOptions()) with
        {
            Progress = p =>
            {
                progress?.Invoke(p);
                if (p.Iteration == 3) (tilesAt, decodedAt) = (self!.VisionTowerTiles, self.Encoder.ImagesDecoded);
            },
        });
        self = trainer;
        var result = trainer.Train(cancel);
        var trained = trainer.Model.named_parameters().Where(p => p.parameter.requires_grad)
            .ToDictionary(p => p.name, p => p.parameter.detach().clone());
        return new Run(result.Losses.ToList(), trained, tilesAt, decodedAt, trainer.VisionTowerTiles, trainer.Encoder.ImagesDecoded, trainer.VisionCache, result);
    }

    private static void AssertSameLosses(IReadOnlyList<double> expected, IReadOnlyList<double> actual)
    {
        Assert.Equal(expected.Count, actual.Count);
        for (int i = 0; i < expected.Count; i++)
            Assert.True(Math.Abs(actual[i] - expected[i]) <= 1e-6 * Math.Abs(expected[i]), $"iteration {i + 1}: loss {actual[i]} vs {expected[i]}");
    }

    private static void AssertSameWeights(Dictionary<string, Tensor> expected, Dictionary<string, Tensor> actual)
    {
        Assert.Equal(expected.Keys.Order(), actual.Keys.Order());
        Assert.Contains(expected.Keys, n => n.StartsWith("mlp1.", StringComparison.Ordinal));
        Assert.Contains(expected.Keys, n => n.Contains(".lora_A", StringComparison.Ordinal));
        foreach (var (name, e) in expected)
        {
            double scale = e.abs().max().item<float>(), diff = (actual[name] - e).abs().max().item<float>();
            Assert.True(diff <= 1e-5 * Math.Max(scale, 1e-3), $"{name}: max difference {diff} (max value {scale})");
        }
    }

    [FixtureFact]
    public void TwoEpochsWithTheCacheTrainAsWithoutItAndSkipDecodingAndTheViTInEpochTwo()
    {
        using var data = new TrainTestData(samples: 6);
        var plain = Train(data, [.. TwoEpochs, $"work_dir={Path.Combine(data.Dir, "plain")}"]);
        var cached = Train(data, [.. TwoEpochs, $"work_dir={Path.Combine(data.Dir, "cached")}", "cache_vision_features=true"]);

        Assert.Equal(6, plain.Losses.Count);
        AssertSameLosses(plain.Losses, cached.Losses);
        AssertSameWeights(plain.Trained, cached.Trained);

        // Without the cache every epoch decodes the 4 images and runs their 4 tiles through the ViT.
        Assert.Equal((8, 8), (plain.TowerTiles, plain.Decoded));
        Assert.Null(plain.Cache);
        // With it: two distinct images (each sample pair shares one), computed and stored in epoch 1 only.
        Assert.True(cached.TowerTilesAtEpochEnd is > 0 and <= 4, $"{cached.TowerTilesAtEpochEnd} tiles in epoch 1");
        Assert.Equal(cached.TowerTilesAtEpochEnd, cached.TowerTiles);
        Assert.Equal(cached.DecodedAtEpochEnd, cached.Decoded);
        var cache = cached.Cache!;
        Assert.Equal(2, cache.Stored);
        Assert.True(cache.Hits >= 4, $"{cache.Hits} hits");
        string dir = Path.Combine(data.Dir, "cached", "vision_cache");
        Assert.Equal(dir, cache.Directory);
        var files = Directory.GetFiles(dir, "*", SearchOption.AllDirectories);
        Assert.Equal(2, files.Length);
        Assert.All(files, f => Assert.EndsWith(".safetensors", f));
        using (var entry = SafetensorsFile.Open(files[0]))
        {
            // Pixel-shuffled ViT output of one tile of the tiny model: 256 tokens × 4 × 64 channels, in the run's fp32.
            Assert.Equal([1L, 256, 256], entry.Entries[VisionFeatureCache.TensorName].Shape);
            Assert.Equal("F32", entry.Entries[VisionFeatureCache.TensorName].DType);
            Assert.Equal("1", entry.Metadata["tiles_per_image"]);
        }
        string log = File.ReadAllText(Directory.GetFiles(cached.Result.RunDir, "*.log").Single());
        Assert.Contains("vision feature cache: " + dir, log);
        // Entries are written in the background: a log window counts those already on disk; the summary comes after all.
        Assert.Matches(@"vision cache: \d of 8 samples with images served from the cache; \d entries stored this run; \d entries, 0\.\d MiB", log);
        Assert.Matches(@"vision cache: \d of 8 samples with images came from the cache this run, 2 entries stored \(0\.5 MiB\)", log);

        // Loader workers encode epoch 2's first batches before epoch 1 has stored everything; those samples find their
        // entries when trained on, so the ViT still runs in epoch 1 only.
        var ahead = Train(data, [.. TwoEpochs, $"work_dir={Path.Combine(data.Dir, "ahead")}", "cache_vision_features=true", "dataloader_num_workers=2"]);
        AssertSameLosses(plain.Losses, ahead.Losses);
        Assert.InRange(ahead.TowerTilesAtEpochEnd, 2, 4);
        Assert.Equal(ahead.TowerTilesAtEpochEnd, ahead.TowerTiles);
        Assert.Equal(2, ahead.Cache!.Stored);
    }

    [FixtureTheory]
    [InlineData("pack_to_max_length=true")]
    [InlineData("quantize_vision=true")]
    public void TheCacheWorksWithPackingAndAnNf4VisionTower(string setting)
    {
        using var data = new TrainTestData(samples: 6);
        var plain = Train(data, [.. TwoEpochs, setting, $"work_dir={Path.Combine(data.Dir, "plain")}"]);
        var cached = Train(data, [.. TwoEpochs, setting, $"work_dir={Path.Combine(data.Dir, "cached")}", "cache_vision_features=true"]);
        AssertSameLosses(plain.Losses, cached.Losses);
        AssertSameWeights(plain.Trained, cached.Trained);
        Assert.Equal(cached.TowerTilesAtEpochEnd, cached.TowerTiles);
        Assert.Equal(2, cached.Cache!.Stored);
    }

    [FixtureFact]
    public void AChangedImageIsNotServedFromTheCache()
    {
        using var data = new TrainTestData(samples: 6);
        string cacheDir = Path.Combine(data.Dir, "shared-cache");
        // Background workers (2) encode ahead of the trainer, as in real runs.
        string[] oneEpoch = ["max_steps=null", "max_epochs=1", $"vision_cache_dir={cacheDir}"];
        var first = Train(data, [.. oneEpoch, "cache_vision_features=true", $"work_dir={Path.Combine(data.Dir, "a")}"]);
        Assert.Equal(2, first.Cache!.Stored);

        // tiny.png now holds another picture; clot.jpg is unchanged.
        File.Copy(Path.Combine(Fixtures.TinyDir, "images", "ivl1.jpg"), Path.Combine(data.Dir, "images", "tiny.png"), overwrite: true);
        var second = Train(data, [.. oneEpoch, "cache_vision_features=true", $"work_dir={Path.Combine(data.Dir, "b")}"]);
        var reference = Train(data, [.. oneEpoch, $"work_dir={Path.Combine(data.Dir, "c")}"]);

        // The new picture's features were computed (once: its two samples share them) and used: same run as without a cache.
        AssertSameLosses(reference.Losses, second.Losses);
        Assert.Equal(2, second.Cache!.EntriesAtOpen);
        Assert.Equal(1, second.Cache.Stored);
        Assert.InRange(second.TowerTiles, 1, 2);
        Assert.InRange(second.Decoded, second.TowerTiles, 2);   // a sample encoded ahead may find the entry when it is trained on
        Assert.True(second.Cache.Hits >= 2, "clot.jpg's entry serves its two samples");
        Assert.Equal(3, Directory.GetFiles(cacheDir, "*.safetensors", SearchOption.AllDirectories).Length);
    }

    [FixtureFact]
    public void AChangedTilingOptionIsNotServedFromTheCache()
    {
        using var data = new TrainTestData(samples: 6);
        // A tall picture (1:3): 1 tile under max_dynamic_patch 1, 2 tiles + thumbnail under 2.
        File.Copy(Path.Combine(Fixtures.TinyDir, "images", "tall.png"), Path.Combine(data.Dir, "images", "clot.jpg"), overwrite: true);
        string cacheDir = Path.Combine(data.Dir, "shared-cache");
        string[] oneEpoch = ["max_steps=null", "max_epochs=1", "dataloader_num_workers=0", $"vision_cache_dir={cacheDir}"];
        var first = Train(data, [.. oneEpoch, "cache_vision_features=true", $"work_dir={Path.Combine(data.Dir, "a")}"]);
        Assert.Equal(2, first.Cache!.Stored);

        // max_dynamic_patch 1 → 2: neither old entry may serve (the tiny picture keeps 1 tile, yet gets a new entry).
        var second = Train(data, [.. oneEpoch, "max_dynamic_patch=2", "cache_vision_features=true", $"work_dir={Path.Combine(data.Dir, "b")}"]);
        var reference = Train(data, [.. oneEpoch, "max_dynamic_patch=2", $"work_dir={Path.Combine(data.Dir, "c")}"]);
        AssertSameLosses(reference.Losses, second.Losses);
        Assert.Equal(2, second.Cache!.EntriesAtOpen);
        Assert.Equal(2, second.Cache.Stored);
        Assert.InRange(second.TowerTiles, 1 + 3, 2 * (1 + 3));
        Assert.Equal(4, Directory.GetFiles(cacheDir, "*.safetensors", SearchOption.AllDirectories).Length);
    }

    [FixtureFact]
    public void ResumingAfterACheckpointReusesTheCache()
    {
        using var data = new TrainTestData(samples: 6);
        var reference = Train(data, [.. TwoEpochs, $"work_dir={Path.Combine(data.Dir, "plain")}"]);

        string[] settings = [.. TwoEpochs, $"work_dir={Path.Combine(data.Dir, "cached")}", "cache_vision_features=true", "save_steps=3"];
        using var cts = new CancellationTokenSource();
        // Stopped during epoch 2's first iteration: the checkpoint is iter_4, after epoch 1 filled the cache.
        var first = Train(data, settings, new TrainerOptions { Progress = p => { if (p.Iteration == 4) cts.Cancel(); } }, cts.Token);
        Assert.True(first.Result.Interrupted);
        Assert.Equal(4, first.Result.Iterations);

        var resumed = Train(data, settings, new TrainerOptions { Resume = "auto" });
        Assert.Equal(6, resumed.Result.Iterations);
        AssertSameLosses(reference.Losses, [.. first.Losses, .. resumed.Losses]);
        AssertSameWeights(reference.Trained, resumed.Trained);
        // The resumed run found every image of iterations 5-6 in the cache: nothing decoded, no ViT.
        Assert.Equal(2, resumed.Cache!.EntriesAtOpen);
        Assert.Equal((0L, 0L, 0L), (resumed.TowerTiles, resumed.Decoded, resumed.Cache.Stored));
        Assert.True(resumed.Cache.Hits > 0);
    }

    [FixtureFact]
    public async Task TwoDataParallelRanksShareOneCacheAndTrainAsWithoutIt()
    {
        // 12 samples (8 with images, two distinct pictures) over 2 ranks × batch 2: 3 iterations per epoch, 2 epochs.
        using var data = new TrainTestData(samples: 12);
        string config = Path.Combine(data.Dir, "dp.yaml");
        File.WriteAllText(config, data.Config("max_steps=null", "max_epochs=2", "log_interval=1", "lr=0.01").Resolved().ToYaml());
        string plain = Path.Combine(data.Dir, "plain"), cached = Path.Combine(data.Dir, "cached");
        var a = await CliProcess.RunAsync(["train", config, "--set", $"work_dir={plain}", "--nproc-per-node", "2"], timeoutSeconds: 180);
        Assert.True(a.ExitCode == 0, a.Stderr + a.Stdout);
        var b = await CliProcess.RunAsync(["train", config, "--set", $"work_dir={cached}", "--set", "cache_vision_features=true", "--nproc-per-node", "2"], timeoutSeconds: 180);
        Assert.True(b.ExitCode == 0, b.Stderr + b.Stdout);

        static List<double> Losses(string work) => File.ReadAllLines(Directory.GetFiles(work, "scalars.json", SearchOption.AllDirectories).Single())
            .Select(l => JsonDocument.Parse(l).RootElement.GetProperty("loss").GetDouble()).ToList();
        var expected = Losses(plain);
        Assert.Equal(6, expected.Count);
        AssertSameLosses(expected, Losses(cached));
        // Both ranks stored into one folder: one complete entry per picture, no temporary left.
        var files = Directory.GetFiles(Path.Combine(cached, "vision_cache"), "*", SearchOption.AllDirectories);
        Assert.Equal(2, files.Length);
        Assert.All(files, f => Assert.EndsWith(".safetensors", f));
        // Epoch 2 on rank 0: every sample with images served from the cache.
        Assert.Contains("vision cache: 2 of 2 samples with images served from the cache on rank 0", b.Stdout);
    }

    [Theory]
    [InlineData("freeze_vision: false", "freeze_vision: false")]
    [InlineData("vision_lora_r: 4", "vision_lora_r: 4")]
    public void ATrainedVisionTowerCannotBeCached(string setting, string named)
    {
        var e = Assert.Throws<ConfigException>(() => TrainConfig.Parse($"""
            model: m
            data: d.jsonl
            mode: full
            cache_vision_features: true
            {setting}
            """, "test.yaml"));
        var problem = Assert.Single(e.Problems, p => p.StartsWith("'cache_vision_features'"));
        Assert.Contains(named, problem);
        Assert.Contains("cache_vision_features: false", problem);
        // A config changed in code after parsing is refused by the trainer before anything loads.
        var edited = TrainConfig.Parse("model: m\ndata: d.jsonl\ncache_vision_features: true\nmax_steps: 1", "test.yaml");
        edited.FreezeVision = false;
        var refused = Assert.Throws<ConfigException>(() => new Trainer(edited).Setup());
        Assert.Contains(refused.Problems, p => p.StartsWith("'cache_vision_features'"));
        // Frozen: accepted, and the resolved config names the cache folder.
        var ok = TrainConfig.Parse("model: m\ndata: d.jsonl\ncache_vision_features: true\nwork_dir: w", "test.yaml");
        Assert.Equal(Path.Combine("w", "vision_cache"), ok.Resolved().VisionCacheDir);
        Assert.Null(TrainConfig.Parse("model: m\ndata: d.jsonl\nwork_dir: w", "test.yaml").Resolved().VisionCacheDir);
    }

    private static byte[][] Read(params string[] paths) => paths.Select(File.ReadAllBytes).ToArray();

    [FixtureFact]
    public void KeysChangeWithTheImagesTheTilingTheWeightsAndTheDtype()
    {
        string dir = Path.Combine(Path.GetTempPath(), "vlmtune-vcache-" + Guid.NewGuid().ToString("N"));
        try
        {
            string model = Path.Combine(dir, "model");
            Directory.CreateDirectory(model);
            foreach (var f in Directory.GetFiles(Fixtures.TinyModel)) File.Copy(f, Path.Combine(model, Path.GetFileName(f)));
            var config = InternVLConfig.Load(model);
            string png = Path.Combine(dir, "a.png"), jpg = Path.Combine(dir, "b.jpg");
            File.Copy(Path.Combine(Fixtures.TinyDir, "images", "tiny.png"), png);
            File.Copy(Path.Combine(Fixtures.TinyDir, "images", "clot.jpg"), jpg);

            var cache = VisionFeatureCache.Open(Path.Combine(dir, "cache"), model, config, ScalarType.Float32, nf4: false, _ => { });
            var options = new ImageProcessorOptions { MaxTiles = 6 };
            string key = cache.KeyFor(Read(png), options);
            Assert.Equal(key, cache.KeyFor(Read(png), options));                                   // deterministic
            var keys = new[]
            {
                key,
                cache.KeyFor(Read(jpg), options),
                cache.KeyFor(Read(png, jpg), options),
                cache.KeyFor(Read(jpg, png), options),
                cache.KeyFor(Read(png), options with { MaxTiles = 4 }),
                cache.KeyFor(Read(png), options with { MinTiles = 2 }),
                cache.KeyFor(Read(png), options with { UseThumbnail = false }),
                cache.KeyFor(Read(png), options with { ImageSize = 224 }),
            };
            Assert.Equal(keys.Length, keys.Distinct().Count());

            // One byte of the image changes the key; where it lies does not matter (a copy shares the entry).
            string copy = Path.Combine(dir, "copy.png");
            File.Copy(png, copy);
            Assert.Equal(key, cache.KeyFor(Read(copy), options));
            var bytes = File.ReadAllBytes(copy);
            bytes[^5] ^= 1;
            File.WriteAllBytes(copy, bytes);
            Assert.NotEqual(key, cache.KeyFor(Read(copy), options));

            // The model fingerprint: dtype, the vision config, the weight file's identity.
            string fingerprint = VisionFeatureCache.Fingerprint(model, config, ScalarType.Float32);
            Assert.Equal(cache.ModelFingerprint, fingerprint);
            Assert.NotEqual(fingerprint, VisionFeatureCache.Fingerprint(model, config, ScalarType.BFloat16));
            Assert.NotEqual(fingerprint, VisionFeatureCache.Fingerprint(model, config, ScalarType.Float32, nf4: true));   // quantize_vision
            Assert.NotEqual(fingerprint, VisionFeatureCache.Fingerprint(model, config with { SelectLayer = -2 }, ScalarType.Float32));
            Assert.NotEqual(fingerprint, VisionFeatureCache.Fingerprint(model, config with { Vision = config.Vision with { LayerNormEps = 1e-5 } }, ScalarType.Float32));
            string weights = Path.Combine(model, CheckpointFolder.SingleFile);
            File.SetLastWriteTimeUtc(weights, File.GetLastWriteTimeUtc(weights).AddSeconds(1));
            Assert.NotEqual(fingerprint, VisionFeatureCache.Fingerprint(model, config, ScalarType.Float32));
            var other = VisionFeatureCache.Open(Path.Combine(dir, "cache"), model, config, ScalarType.Float32, nf4: false, _ => { });
            Assert.NotEqual(key, other.KeyFor(Read(png), options));
        }
        finally { Directory.Delete(dir, true); }
    }

    [FixtureFact]
    public void EntriesRoundTripAndUnusableOnesAreMisses()
    {
        string dir = Path.Combine(Path.GetTempPath(), "vlmtune-vcache-" + Guid.NewGuid().ToString("N"));
        try
        {
            var config = InternVLConfig.Load(Fixtures.TinyModel);
            var warnings = new List<string>();
            var cache = VisionFeatureCache.Open(dir, Fixtures.TinyModel, config, ScalarType.Float32, nf4: false, warnings.Add);
            string key = new string('a', 64);
            Assert.Null(cache.TryLoad(key, 2));
            using var features = randn(3, 4, 8);
            cache.Store(new VisionCacheEntry(key, [1, 2]), features);
            // Written in the background: served (from memory or disk) at once, on disk after Flush.
            using (var early = cache.TryLoadStored(new VisionCacheEntry(key, [1, 2])))
                Assert.True(early!.allclose(features, 0, 0));
            cache.Store(new VisionCacheEntry(key, [1, 2]), features);   // pending or present: not written twice
            cache.Flush();
            Assert.Equal(1, cache.Stored);
            Assert.True(File.Exists(cache.PathOf(key)));
            Assert.Empty(Directory.GetFiles(dir, "*.tmp-*", SearchOption.AllDirectories));

            var (tiles, loaded) = cache.TryLoad(key, 2)!.Value;
            using (loaded)
            {
                Assert.Equal([1, 2], tiles);
                Assert.True(loaded.allclose(features, 0, 0));
            }
            Assert.Null(cache.TryLoad(key, 1));                          // another image count: not this sample's entry
            Assert.Contains(warnings, w => w.Contains("tiles_per_image"));
            Assert.Throws<ArgumentException>(() => cache.Store(new VisionCacheEntry(new string('b', 64), [1]), features));

            // A damaged file (not one of ours: our writes are atomic) is a miss with a warning, never an error.
            File.WriteAllBytes(cache.PathOf(key), [1, 2, 3]);
            warnings.Clear();
            Assert.Null(cache.TryLoad(key, 2));
            Assert.Contains(warnings, w => w.Contains("unreadable") && w.Contains(cache.PathOf(key)));
            Assert.Equal((2L, 3L), (cache.Hits, cache.Misses));

            // A bf16 cache does not take fp32 entries.
            var bf16 = VisionFeatureCache.Open(dir, Fixtures.TinyModel, config, ScalarType.BFloat16, nf4: false, warnings.Add);
            string k2 = new string('c', 64);
            cache.Store(new VisionCacheEntry(k2, [3]), features);
            cache.Flush();
            Assert.Null(bf16.TryLoad(k2, 1));
        }
        finally { Directory.Delete(dir, true); }
    }
}
