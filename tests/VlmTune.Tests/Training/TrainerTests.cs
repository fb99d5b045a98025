using System.Text.Json;
using System.Text.RegularExpressions;
using VlmTune.Checkpoints;
using VlmTune.Tests.Support;
using VlmTune.Training;

namespace VlmTune.Tests.Training;

/// <summary>End-to-end training runs of the tiny model on CPU (fp32) on small generated data.</summary>
[Collection(GlobalTorchRng.Name)]
public sealed class TrainerTests
{
    [FixtureTheory]
    [InlineData("full", "0.01")]
    [InlineData("lora", "0.01")]
    [InlineData("qlora", "0.01")]
    public void ThirtyStepsDriveTheLossDown(string mode, string lr)
    {
        using var data = new TrainTestData();
        using var trainer = new Trainer(data.Config($"mode={mode}", $"lr={lr}"));
        var result = trainer.Train();
        Assert.Equal(30, result.Losses.Count);
        Assert.All(result.Losses, l => Assert.True(double.IsFinite(l)));
        double first = result.Losses.Take(3).Average(), last = result.Losses.TakeLast(5).Average();
        Console.WriteLine($"{mode}: first {first:F3} last {last:F3}: {string.Join(" ", result.Losses.Select(l => l.ToString("F2")))}");
        Assert.True(last < 0.5 * first, $"{mode}: loss went from {first:F3} to {last:F3}");
        Assert.Equal(30, result.OptimizerSteps);
        Assert.NotNull(result.LastCheckpoint);
    }

    [FixtureFact]
    public void ResumedRunGivesTheSameLossesAsAnUninterruptedOne()
    {
        using var data = new TrainTestData();
        string[] settings = ["max_steps=8", "accumulative_counts=2", "save_steps=4", "lora_dropout=0.1", "dataloader_num_workers=0"];
        List<double> full;
        using (var trainer = new Trainer(data.Config([.. settings, "name=a", $"work_dir={Path.Combine(data.Dir, "a")}"])))
            full = trainer.Train().Losses.ToList();

        string workB = Path.Combine(data.Dir, "b");
        using var cts = new CancellationTokenSource();
        TrainResult first;
        using (var trainer = new Trainer(data.Config([.. settings, $"work_dir={workB}"]),
                   new TrainerOptions { Progress = p => { if (p.Iteration == 5) cts.Cancel(); } }))
            first = trainer.Train(cts.Token);
        Assert.True(first.Interrupted);
        // Ctrl-C after iteration 5 (mid-way through the third accumulation cycle) saves the state of the last step.
        Assert.Equal(4, first.Iterations);
        Assert.Equal(Path.Combine(workB, "iter_4"), first.LastCheckpoint);

        TrainResult second;
        using (var trainer = new Trainer(data.Config([.. settings, $"work_dir={workB}"]), new TrainerOptions { Resume = "auto" }))
            second = trainer.Train();
        Assert.Equal(8, second.Iterations);
        Assert.Equal(4, second.OptimizerSteps);
        var resumed = first.Losses.Take(4).Concat(second.Losses).ToList();
        Assert.Equal(8, resumed.Count);
        for (int i = 0; i < 8; i++)
            Assert.True(Math.Abs(resumed[i] - full[i]) <= 1e-5 * Math.Abs(full[i]), $"iteration {i + 1}: {resumed[i]} vs {full[i]}");
    }

    [FixtureFact]
    public void BogusResumePathIsAClearError()
    {
        using var data = new TrainTestData(samples: 3);
        string missing = Path.Combine(data.Dir, "nowhere");
        var e = Assert.Throws<ConfigException>(() => new Trainer(data.Config(), new TrainerOptions { Resume = missing }).Setup());
        Assert.Contains("--resume", e.Message);
        Assert.Contains(missing, e.Message);
        Directory.CreateDirectory(Path.Combine(data.Dir, "half"));
        e = Assert.Throws<ConfigException>(() => new Trainer(data.Config(), new TrainerOptions { Resume = Path.Combine(data.Dir, "half") }).Setup());
        Assert.Contains(IterCheckpoint.StateFile, e.Message);
    }

    [FixtureFact]
    public void BrokenImagesAreSkippedAndCounted()
    {
        var jpeg = File.ReadAllBytes(Path.Combine(Fixtures.TinyDir, "images", "clot.jpg"));
        var broken = new Dictionary<string, byte[]>
        {
            ["garbage.jpg"] = "this is not an image at all"u8.ToArray(),
            ["truncated.jpg"] = jpeg[..(jpeg.Length / 3)],
        };
        using var data = new TrainTestData(samples: 6, broken: broken);
        using var trainer = new Trainer(data.Config("max_steps=4", "save_steps=0"));
        var result = trainer.Train();
        Assert.Equal(4, result.Iterations);
        Assert.Equal(2, result.Counters.BrokenImages);
        Assert.All(result.Losses, l => Assert.True(double.IsFinite(l)));
        string log = File.ReadAllText(Directory.GetFiles(result.RunDir, "*.log").Single());
        Assert.Contains("garbage.jpg", log);
        Assert.Contains("truncated.jpg", log);
        Assert.Contains("broken images: 2", log);
    }

    [FixtureFact]
    public void LogsScalarsAndCheckpointsHaveTheDocumentedLayout()
    {
        using var data = new TrainTestData();
        using var trainer = new Trainer(data.Config("max_steps=12", "log_interval=4", "save_steps=4", "save_total_limit=2"));
        var result = trainer.Train();

        // work_dirs/<name>/<YYYYMMDD_HHMMSS>/<timestamp>.log, vis_data/scalars.json, vis_data/config.yaml
        Assert.Equal(data.WorkDir, Path.GetDirectoryName(result.RunDir));
        string stamp = Path.GetFileName(result.RunDir);
        Assert.Matches(@"^\d{8}_\d{6}$", stamp);
        string log = File.ReadAllText(Path.Combine(result.RunDir, stamp + ".log"));
        var lines = Regex.Matches(log, @"Iter\(train\) \[(?<i>[ \d]+)/12\]  lr: \d\.\d{4}e[-+]\d{2}  eta: \d+:\d{2}:\d{2}  time: \d+\.\d{4}  data_time: \d+\.\d{4}  memory: \d+  loss: \d+\.\d{4}  grad_norm: \d+\.\d{4}  tokens_per_s: \d+\.\d  mfu: -");
        Assert.Equal([" 4", " 8", "12"], lines.Select(m => m.Groups["i"].Value));
        Assert.Contains("dynamic ViT batch size: ", log);
        Assert.Contains("images per sample: ", log);
        Assert.Contains("dynamic token length: ", log);

        var scalars = File.ReadAllLines(Path.Combine(result.RunDir, "vis_data", "scalars.json")).Select(l => JsonDocument.Parse(l).RootElement).ToList();
        Assert.Equal(3, scalars.Count);
        foreach (var key in new[] { "lr", "loss", "time", "data_time", "memory", "iter", "step", "grad_norm", "tokens_per_s" })
            Assert.All(scalars, s => Assert.Equal(JsonValueKind.Number, s.GetProperty(key).ValueKind));
        Assert.Equal([4, 8, 12], scalars.Select(s => s.GetProperty("iter").GetInt32()));
        Assert.True(scalars[2].GetProperty("loss").GetDouble() < scalars[0].GetProperty("loss").GetDouble());

        // The resolved config reads back as the same config.
        string yaml = File.ReadAllText(Path.Combine(result.RunDir, "vis_data", "config.yaml"));
        var reread = TrainConfig.Parse(yaml, "config.yaml");
        Assert.Equal(trainer.Config.Resolved().ToYaml(), reread.ToYaml());
        Assert.Equal(data.WorkDir, reread.ResolvedWorkDir);
        Assert.Equal("test", reread.RunName);
        Assert.Contains("freeze_llm: true", yaml);
        Assert.Contains("dtype: 'fp32'", yaml);

        // Checkpoints: iter_8 and iter_12 kept (limit 2), each a PEFT adapter + projector weights + optimizer + state.
        var dirs = Directory.GetDirectories(data.WorkDir, "iter_*").Select(Path.GetFileName).Order().ToList();
        Assert.Equal(["iter_12", "iter_8"], dirs);
        Assert.Empty(Directory.GetDirectories(data.WorkDir, ".iter_*"));
        string last = Path.Combine(data.WorkDir, "iter_12");
        Assert.Equal(last, result.LastCheckpoint);
        foreach (var f in new[] { PeftAdapter.ConfigFile, PeftAdapter.WeightsFile, IterCheckpoint.TrainableFile, IterCheckpoint.OptimizerFile, IterCheckpoint.StateFile })
            Assert.True(File.Exists(Path.Combine(last, f)), f);
        using (var adapter = SafetensorsFile.Open(Path.Combine(last, PeftAdapter.WeightsFile)))
        {
            Assert.Contains("base_model.model.model.layers.0.attention.wqkv.lora_A.weight", adapter.Entries.Keys);
            Assert.Contains("base_model.model.output.lora_B.weight", adapter.Entries.Keys);
        }
        using (var trained = SafetensorsFile.Open(Path.Combine(last, IterCheckpoint.TrainableFile)))
            Assert.Equal(["mlp1.0.bias", "mlp1.0.weight", "mlp1.1.bias", "mlp1.1.weight", "mlp1.3.bias", "mlp1.3.weight"], trained.Entries.Keys.Order());

        // A checkpoint folder that a kill -9 left half-written (a temporary sibling) is never picked up.
        Directory.CreateDirectory(Path.Combine(data.WorkDir, ".iter_16.tmp-dead"));
        Directory.CreateDirectory(Path.Combine(data.WorkDir, "iter_20"));   // no trainer_state.json: incomplete
        File.Delete(Path.Combine(data.WorkDir, IterCheckpoint.LastCheckpointFile));
        Assert.Equal(last, IterCheckpoint.Latest(data.WorkDir));

        // The checkpoint applies to a fresh model for inference: adapter merged, trained projector loaded.
        using var model = GoldenSample.FreshModel();
        var applied = AdapterLoader.Apply(model, last, new AdapterApplyOptions { MergeIntoWeights = true });
        Assert.Equal(11, applied.LoraLayers);
        Assert.Equal(6, applied.TrainedTensors);
        Assert.Empty(PeftAdapter.LoraLinears(model));
        Assert.True(model.mlp1.named_parameters().All(p => p.parameter.allclose(trainer.Model.mlp1.get_parameter(p.name)!, 0, 0)));
        Assert.False(model.mlp1.named_parameters().All(p => p.parameter.allclose(GoldenSample.FreshModel().mlp1.get_parameter(p.name)!, 0, 0)));
    }

    [FixtureTheory]
    [InlineData("stop")]
    [InlineData("skip")]
    public void NonFiniteLossStopsNamingTheStepOrIsSkippedAndCounted(string policy)
    {
        using var data = new TrainTestData(samples: 6);
        // An absurd learning rate blows the weights up within a few steps.
        using var trainer = new Trainer(data.Config("lr=1e30", "max_steps=6", $"nan_policy={policy}", "mode=full", "gradient_checkpointing=false"));
        if (policy == "stop")
        {
            var e = Assert.Throws<TrainingDivergedException>(() => trainer.Train());
            Assert.Matches(@"iteration \d+ \(optimizer step \d+\)", e.Message);
            Assert.Matches(@"(samples|after samples) s\d+", e.Message);
        }
        else
        {
            var result = trainer.Train();
            Assert.Equal(6, result.Iterations);
            Assert.True(result.Counters.NanSkipped > 0);
            Assert.Contains(result.Losses, double.IsNaN);
            string log = File.ReadAllText(Directory.GetFiles(result.RunDir, "*.log").Single());
            Assert.DoesNotContain("loss: 0.0000", log);
        }
    }

    [FixtureFact]
    public void VisionLoraIsTrainedAndSavedAsItsOwnPeftAdapter()
    {
        using var data = new TrainTestData(samples: 4);
        using var trainer = new Trainer(data.Config("vision_lora_r=4", "max_steps=2", "freeze_projector=true"));
        var result = trainer.Train();
        Assert.All(result.Losses, l => Assert.True(double.IsFinite(l)));
        string adapter = Path.Combine(result.LastCheckpoint!, IterCheckpoint.VisionAdapterDir);
        using (var file = SafetensorsFile.Open(Path.Combine(adapter, PeftAdapter.WeightsFile)))
            Assert.Contains("base_model.model.encoder.layers.0.attn.qkv.lora_A.weight", file.Entries.Keys);
        Assert.False(File.Exists(Path.Combine(result.LastCheckpoint!, IterCheckpoint.TrainableFile)));   // projector frozen: nothing else trained
        using var model = GoldenSample.FreshModel();
        PeftAdapter.Load(model.vision_model, adapter);
        Assert.Equal(8, PeftAdapter.LoraLinears(model.vision_model).Count());
    }

    [FixtureFact]
    public void SamplesWhoseImageTokensWouldBeCutAreDroppedAndCounted()
    {
        using var data = new TrainTestData(samples: 6);
        // 256 image tokens per tile cannot fit in 200 tokens: the four image samples go, the two text-only ones stay.
        using var trainer = new Trainer(data.Config("max_length=200", "max_steps=2"));
        var result = trainer.Train();
        Assert.Equal(4, result.Counters.TooLong);
        Assert.Equal(2, trainer.Dataset.Samples.Count);
        Assert.All(trainer.Dataset.Lengths, l => Assert.True(l < 0));   // text-only
        Assert.All(result.Losses, l => Assert.True(double.IsFinite(l)));
        Assert.Contains("too long: 4", File.ReadAllText(Directory.GetFiles(result.RunDir, "*.log").Single()));
    }

    [FixtureFact]
    public void InputProblemsAreReportedTogetherBeforeTheModelLoads()
    {
        using var data = new TrainTestData(samples: 2);
        string notData = Path.Combine(data.Dir, "notes.txt");
        File.WriteAllText(notData, "hello");
        var e = Assert.Throws<ConfigException>(() => new Trainer(data.Config(
            $"data=[{data.DataFile}, {notData}, {Path.Combine(data.Dir, "missing.jsonl")}]", "model=/nonexistent/model", "template=chatml")).Setup());
        Assert.Contains(e.Problems, p => p.StartsWith("'model'"));
        Assert.Contains(e.Problems, p => p.StartsWith("'data'") && p.Contains("notes.txt"));
        Assert.Contains(e.Problems, p => p.StartsWith("'data'") && p.Contains("missing.jsonl"));
        Assert.Contains(e.Problems, p => p.StartsWith("'template'"));
        Assert.Equal(4, e.Problems.Count);
        Assert.False(Directory.Exists(data.WorkDir));
    }
}
