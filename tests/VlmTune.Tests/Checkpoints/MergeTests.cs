using System.Text.Json;
using System.Text.Json.Nodes;
using VlmTune.Checkpoints;
using VlmTune.Inference;
using VlmTune.Models;
using VlmTune.Quantization;
using VlmTune.Tests.Support;
using VlmTune.Tests.Training;
using VlmTune.Training;
using static TorchSharp.torch;

namespace VlmTune.Tests.Checkpoints;

/// <summary>vlmtune merge as a library: golden merged logits, official layout, shards, refusals and the atomic write.</summary>
public sealed class MergeTests : IDisposable
{
    private const double Tight = 2e-3;   // GOLDEN.md: logits / lse max abs diff in fp32
    private const double Loose = 5e-2;   // bf16-rounded merged weights

    private readonly string _dir = Directory.CreateTempSubdirectory("vlmtune-merge-").FullName;

    public void Dispose()
    {
        try { Directory.Delete(_dir, true); } catch (IOException) { }
    }

    private string Out(string name = "merged") => Path.Combine(_dir, name);

    private static MergeResult Merge(string outDir, ScalarType? dtype = null, string? baseDir = null, string? adapter = null,
        bool verify = true, long maxShard = ModelMerger.DefaultMaxShardBytes, bool force = false, Action<MergeProgress>? progress = null,
        CancellationToken cancel = default) =>
        ModelMerger.Merge(new MergeOptions
        {
            BaseDir = baseDir ?? Fixtures.TinyModel, AdapterDir = adapter ?? Fixtures.Adapter, OutDir = outDir, DType = dtype,
            Verify = verify ? new MergeVerifyOptions() : null, MaxShardBytes = maxShard, Force = force, Progress = progress,
        }, cancel);

    /// <summary>Logits (T, V) of the golden train sample, with the official rotary state the goldens were computed in.</summary>
    private static Tensor SampleLogits(InternVLChatModel model)
    {
        model.language_model.Rotary.MinDynamicLength = GoldenSample.SeenLength;
        using var _ = no_grad();
        return model.language_model.Logits(GoldenSample.Hidden(model))[0];
    }

    private static InternVLChatModel LoadExact(string dir) => InternVLModelLoader.Load(dir, new ModelOptions { Attention = AttentionKind.Exact });

    private static double MaxDiff(Tensor a, Tensor b) => (a.to_type(ScalarType.Float32) - b.to_type(ScalarType.Float32)).abs().max().item<float>();

    [FixtureFact]
    public void Fp32MergeMatchesGoldenMergedLogitsAndTheUnmergedAdapter()
    {
        using var scope = NewDisposeScope();
        var result = Merge(Out(), ScalarType.Float32);
        Assert.Equal(10, result.LoraModules);
        Assert.NotNull(result.Verify);
        Assert.True(result.Verify!.Passed, result.Verify.ToString());
        Assert.True(result.Verify.MaxAbsDiff <= 1e-3, result.Verify.ToString());

        var golden = Fixtures.GoldenTensors;
        using (var merged = LoadExact(Out()))
        {
            var logits = SampleLogits(merged);
            Assert.True(MaxDiff(golden.Read("merged_logits_last"), logits[^4..]) <= Tight, "merged logits vs golden");
            Assert.True(MaxDiff(golden.Read("merged_lse"), logits.logsumexp(-1)) <= Tight, "merged lse vs golden");
        }
        using (var unmerged = LoadExact(Fixtures.TinyModel))
        {
            string description = AdapterLoader.Apply(unmerged, Fixtures.Adapter).Description;
            Assert.Contains("LLM LoRA r=8", description);
            Assert.Equal(10, PeftAdapter.LoraLinears(unmerged).Count());
            var logits = SampleLogits(unmerged);
            Assert.True(MaxDiff(golden.Read("merged_logits_last"), logits[^4..]) <= Tight, "base + adapter logits vs golden");
            Assert.True(MaxDiff(golden.Read("merged_lse"), logits.logsumexp(-1)) <= Tight, "base + adapter lse vs golden");
        }
        using (var inMemory = LoadExact(Fixtures.TinyModel))
        {
            // Merged in memory (serving): no branch left, the same logits.
            AdapterLoader.Apply(inMemory, Fixtures.Adapter, new AdapterApplyOptions { MergeIntoWeights = true });
            Assert.Empty(PeftAdapter.LoraLinears(inMemory));
            var logits = SampleLogits(inMemory);
            Assert.True(MaxDiff(golden.Read("merged_logits_last"), logits[^4..]) <= Tight, "in-memory merged logits vs golden");
            using var fresh = LoadExact(Fixtures.TinyModel);
            Assert.Throws<VlmTuneException>(() => AdapterLoader.Apply(fresh, Fixtures.Adapter, new AdapterApplyOptions { MergeIntoWeights = true, Nf4Base = true }));
        }
        using var stored = CheckpointFolder.Open(Out());
        Assert.All(stored.Names, n => Assert.Equal("F32", stored.Entry(n).DType));
        Assert.Equal("float32", Config(Out())["torch_dtype"]!.GetValue<string>());
        Assert.Equal("float32", Config(Out())["llm_config"]!["torch_dtype"]!.GetValue<string>());
    }

    [FixtureFact]
    public void DefaultMergeKeepsTheBaseLayoutKeysAndDtypesAndIsCloseInBf16()
    {
        using var scope = NewDisposeScope();
        var result = Merge(Out());
        Assert.True(result.Verify!.Passed, result.Verify.ToString());

        // Exactly the official files: weights, config, tokenizer and generation files; nothing else.
        var expected = Directory.GetFiles(Fixtures.TinyModel).Select(Path.GetFileName).Order().ToList();
        Assert.Equal(expected, Directory.GetFiles(Out()).Select(Path.GetFileName).Order().ToList());
        Assert.Empty(Directory.GetDirectories(Out()));
        foreach (var file in expected.Where(f => f is not ("config.json" or "model.safetensors" or "tokenizer_config.json")))
            Assert.Equal(File.ReadAllBytes(Path.Combine(Fixtures.TinyModel, file!)), File.ReadAllBytes(Path.Combine(Out(), file!)));
        // tokenizer_config.json: the template's chat_template, every other key as in the base.
        var tokenizerConfig = JsonNode.Parse(File.ReadAllText(Path.Combine(Out(), "tokenizer_config.json")))!.AsObject();
        Assert.Equal(VlmTune.Text.ConversationTemplate.InternLM2Chat.HuggingFaceChatTemplate(bosToken: true), tokenizerConfig["chat_template"]!.GetValue<string>());
        var baseTokenizerConfig = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.TinyModel, "tokenizer_config.json")))!.AsObject();
        baseTokenizerConfig["chat_template"] = tokenizerConfig["chat_template"]!.DeepClone();
        Assert.True(JsonNode.DeepEquals(baseTokenizerConfig, tokenizerConfig), "tokenizer_config.json unchanged apart from chat_template");

        using (var baseWeights = CheckpointFolder.Open(Fixtures.TinyModel))
        using (var merged = CheckpointFolder.Open(Out()))
        {
            Assert.Equal(baseWeights.Names.Order(), merged.Names.Order());
            foreach (var name in baseWeights.Names)
            {
                Assert.Equal(baseWeights.Entry(name).DType, merged.Entry(name).DType);
                Assert.Equal(baseWeights.Entry(name).Shape, merged.Entry(name).Shape);
            }
            // Untouched tensors are bit-identical; LoRA targets changed.
            Assert.True(Same(baseWeights.Read("mlp1.1.weight"), merged.Read("mlp1.1.weight")));
            Assert.True(Same(baseWeights.Read("language_model.output.weight"), merged.Read("language_model.output.weight")));
            Assert.False(Same(baseWeights.Read("language_model.model.layers.1.feed_forward.w2.weight"), merged.Read("language_model.model.layers.1.feed_forward.w2.weight")));
        }

        // The same config.json fields, the template explicit, torch_dtype the base's.
        var baseConfig = Config(Fixtures.TinyModel);
        var config = Config(Out());
        Assert.Equal(baseConfig.Select(p => p.Key).Order(), config.Select(p => p.Key).Order());
        Assert.True(JsonNode.DeepEquals(baseConfig, config), "config.json unchanged apart from what the merge sets");
        Assert.Equal("internlm2-chat", config["template"]!.GetValue<string>());

        using var model = LoadExact(Out());
        var logits = SampleLogits(model);
        var golden = Fixtures.GoldenTensors;
        Assert.True(MaxDiff(golden.Read("merged_logits_last"), logits[^4..]) <= Loose, "bf16 merged logits vs golden");
        Assert.True(MaxDiff(golden.Read("merged_lse"), logits.logsumexp(-1)) <= Loose, "bf16 merged lse vs golden");
        // Same argmax on most positions (ties between near-equal logits may flip with bf16 rounding).
        using var fp32 = LoadExact(Fixtures.TinyModel);
        AdapterLoader.Apply(fp32, Fixtures.Adapter);
        var reference = SampleLogits(fp32);
        double agree = logits.argmax(-1).eq(reference.argmax(-1)).to_type(ScalarType.Float32).mean().item<float>();
        Assert.True(agree >= 0.9, $"argmax agrees at {agree:P1} of positions");
    }

    [FixtureFact]
    public void MissingTemplateIsWrittenExplicitlyAndFloat16UpdatesTheDtypeFields()
    {
        using var b = new ModelFolderBuilder().Config(c => c.Remove("template"));
        string baseDir = b.Build();
        Merge(Out(), ScalarType.Float16, baseDir: baseDir, verify: false);
        var config = Config(Out());
        Assert.Equal("internlm2-chat", config["template"]!.GetValue<string>());
        Assert.Equal("float16", config["torch_dtype"]!.GetValue<string>());
        Assert.Equal("float16", config["vision_config"]!["torch_dtype"]!.GetValue<string>());
        Assert.False(config["llm_config"]!["use_bfloat16"]!.GetValue<bool>());
        using var merged = CheckpointFolder.Open(Out());
        Assert.All(merged.Names, n => Assert.Equal("F16", merged.Entry(n).DType));
    }

    [FixtureFact]
    public void TokenizerConfigGetsTheChatTemplateOfTheConfigTemplateAndSystemMessage()
    {
        using var b = new ModelFolderBuilder().Config(c => { c["template"] = "internvl2_5"; c["system_message"] = "Custom."; });
        Merge(Out(), baseDir: b.Build(), verify: false);
        var tokenizerConfig = JsonNode.Parse(File.ReadAllText(Path.Combine(Out(), "tokenizer_config.json")))!;
        Assert.Equal(VlmTune.Text.ConversationTemplate.InternVL25.HuggingFaceChatTemplate(bosToken: true, systemMessage: "Custom."),
            tokenizerConfig["chat_template"]!.GetValue<string>());
    }

    [FixtureFact]
    public void ShardedBaseAndShardedOutputWithRemoteCodeLoadAndGiveTheSameWeights()
    {
        using var b = new ModelFolderBuilder();
        string baseDir = b.Build(shards: 3);
        File.WriteAllText(Path.Combine(baseDir, "modeling_internvl_chat.py"), "# remote code\n");
        File.WriteAllText(Path.Combine(baseDir, "configuration_internvl_chat.py"), "# remote code\n");
        File.WriteAllText(Path.Combine(baseDir, "README.md"), "base model card\n");

        const long maxShard = 4_000_000;
        var sharded = Merge(Out("sharded"), baseDir: baseDir, maxShard: maxShard);
        Assert.True(sharded.Verify!.Passed, sharded.Verify.ToString());
        Assert.True(sharded.Shards.Count > 2, $"{sharded.Shards.Count} shards");
        Merge(Out("single"), verify: false);

        var files = Directory.GetFiles(Out("sharded")).Select(Path.GetFileName).ToHashSet();
        Assert.Contains("modeling_internvl_chat.py", files);
        Assert.Contains("configuration_internvl_chat.py", files);
        Assert.DoesNotContain("README.md", files);
        Assert.DoesNotContain("model.safetensors", files);
        Assert.Equal(sharded.Shards.Select((_, i) => $"model-{i + 1:D5}-of-{sharded.Shards.Count:D5}.safetensors"), sharded.Shards);

        var index = JsonNode.Parse(File.ReadAllText(Path.Combine(Out("sharded"), CheckpointFolder.IndexFile)))!;
        var map = index["weight_map"]!.AsObject();
        long total = 0;
        foreach (var shard in sharded.Shards)
        {
            using var f = SafetensorsFile.Open(Path.Combine(Out("sharded"), shard));
            long bytes = f.Entries.Values.Sum(e => e.ByteLength);
            Assert.True(bytes <= maxShard || f.Entries.Count == 1, $"{shard}: {bytes} bytes in {f.Entries.Count} tensors");
            Assert.All(f.Entries.Keys, k => Assert.Equal(shard, map[k]!.GetValue<string>()));
            total += bytes;
        }
        Assert.Equal(total, index["metadata"]!["total_size"]!.GetValue<long>());

        using var single = CheckpointFolder.Open(Out("single"));
        using var split = CheckpointFolder.Open(Out("sharded"));
        Assert.Equal(single.Names.Order(), split.Names.Order());
        foreach (var name in single.Names)
            Assert.True(Same(single.Read(name), split.Read(name)), name);
        using var model = InternVLModelLoader.Load(Out("sharded"), new ModelOptions());
    }

    [FixtureFact]
    public void RefusesOutEqualToBaseOrContainingItAndNonEmptyOutWithoutForce()
    {
        using var b = new ModelFolderBuilder();
        string baseDir = b.Build();
        var before = Directory.GetFiles(baseDir).ToDictionary(f => f, File.ReadAllBytes);

        foreach (var same in new[] { baseDir, baseDir + Path.DirectorySeparatorChar, Path.Combine(baseDir, "..", Path.GetFileName(baseDir)) })
        {
            var e = Assert.Throws<VlmTuneException>(() => Merge(same, baseDir: baseDir, force: true, verify: false));
            Assert.Contains("is the base model folder", e.Message);
        }
        var parent = Assert.Throws<VlmTuneException>(() => Merge(Path.GetDirectoryName(baseDir)!, baseDir: baseDir, force: true, verify: false));
        Assert.Contains("contains the base model folder", parent.Message);
        Assert.Equal(before.Keys.Order(), Directory.GetFiles(baseDir).Order());
        foreach (var (f, bytes) in before) Assert.Equal(bytes, File.ReadAllBytes(f));

        Directory.CreateDirectory(Out());
        File.WriteAllText(Path.Combine(Out(), "keep.txt"), "precious");
        var busy = Assert.Throws<VlmTuneException>(() => Merge(Out(), verify: false));
        Assert.Contains("not empty; pass --force", busy.Message);
        Assert.Equal("precious", File.ReadAllText(Path.Combine(Out(), "keep.txt")));

        Merge(Out(), verify: false, force: true);
        Assert.False(File.Exists(Path.Combine(Out(), "keep.txt")));
        Assert.True(File.Exists(Path.Combine(Out(), "model.safetensors")));

        // An empty folder is fine without --force.
        Directory.CreateDirectory(Out("empty"));
        Merge(Out("empty"), verify: false);
        Assert.True(File.Exists(Path.Combine(Out("empty"), "config.json")));
        Assert.Empty(Directory.GetFileSystemEntries(_dir, ".*"));   // no temporary folder left behind
    }

    [FixtureFact]
    public void AFailureMidWriteLeavesNoOutputAndNoTemporaryFolder()
    {
        // An adapter whose last layer's LoRA B is finite but huge: its merged weight overflows float16, so merging to
        // float16 fails after most tensors were written. (NaN weights are refused before anything is written.)
        string adapter = Path.Combine(_dir, "bad-adapter");
        Directory.CreateDirectory(adapter);
        File.Copy(Path.Combine(Fixtures.Adapter, PeftAdapter.ConfigFile), Path.Combine(adapter, PeftAdapter.ConfigFile));
        using (var good = SafetensorsFile.Open(Path.Combine(Fixtures.Adapter, PeftAdapter.WeightsFile)))
        {
            var tensors = good.Entries.Keys.Order().Select(k => new KeyValuePair<string, Tensor>(k, good.Read(k))).ToList();
            var last = tensors.Single(t => t.Key == "base_model.model.model.layers.1.feed_forward.w2.lora_B.weight").Value;
            last[0, 0] = 1e30f;
            SafetensorsWriter.Write(Path.Combine(adapter, PeftAdapter.WeightsFile), tensors);
        }
        int written = 0;
        var e = Assert.Throws<VlmTuneException>(() => Merge(Out(), ScalarType.Float16, adapter: adapter, progress: p => written = p.Done));
        Assert.Contains("overflows", e.Message);
        Assert.Contains("layers.1.feed_forward.w2", e.Message);
        Assert.True(written > 0, "the failure came mid-write, after some tensors");
        Assert.False(Directory.Exists(Out()));
        Assert.Equal(["bad-adapter"], Directory.GetFileSystemEntries(_dir).Select(Path.GetFileName));

        // Cancelled (Ctrl-C) half-way while replacing an existing folder with --force: the old folder stays as it was.
        Directory.CreateDirectory(Out());
        File.WriteAllText(Path.Combine(Out(), "old.txt"), "old model");
        using var cts = new CancellationTokenSource();
        Assert.ThrowsAny<OperationCanceledException>(() => Merge(Out(), force: true, progress: p => { if (p.Done == 20) cts.Cancel(); }, cancel: cts.Token));
        Assert.Equal(["old.txt"], Directory.GetFiles(Out()).Select(Path.GetFileName));
        Assert.Equal(["bad-adapter", "merged"], Directory.GetFileSystemEntries(_dir).Select(Path.GetFileName).Order());
    }

    [FixtureFact]
    public void AdapterProblemsAreReportedAtOnceNamingTheTensors()
    {
        string adapter = Path.Combine(_dir, "odd-adapter");
        Directory.CreateDirectory(adapter);
        File.Copy(Path.Combine(Fixtures.Adapter, PeftAdapter.ConfigFile), Path.Combine(adapter, PeftAdapter.ConfigFile));
        using (var good = SafetensorsFile.Open(Path.Combine(Fixtures.Adapter, PeftAdapter.WeightsFile)))
        {
            var tensors = good.Entries.Keys.Order()
                .Where(k => k != "base_model.model.model.layers.0.attention.wo.lora_B.weight")
                .Select(k => new KeyValuePair<string, Tensor>(k, good.Read(k))).ToList();
            SafetensorsWriter.Write(Path.Combine(adapter, PeftAdapter.WeightsFile), tensors);
        }
        var e = Assert.Throws<CheckpointException>(() => Merge(Out(), adapter: adapter));
        Assert.Contains("'model.layers.0.attention.wo' has lora_B missing", e.Message);
        Assert.False(Directory.Exists(Out()));

        Directory.CreateDirectory(Path.Combine(_dir, "nothing"));
        e = Assert.Throws<CheckpointException>(() => Merge(Out(), adapter: Path.Combine(_dir, "nothing")));
        Assert.Contains("no adapter_config.json", e.Message);
    }

    /// <summary>A PEFT adapter saved relative to the whole InternVLChatModel (language_model.… names) merges the same.</summary>
    [FixtureFact]
    public void WholeModelRootedAdapterMergesLikeTheLlmRootedOne()
    {
        string adapter = Path.Combine(_dir, "rooted-adapter");
        Directory.CreateDirectory(adapter);
        File.Copy(Path.Combine(Fixtures.Adapter, PeftAdapter.ConfigFile), Path.Combine(adapter, PeftAdapter.ConfigFile));
        using (var good = SafetensorsFile.Open(Path.Combine(Fixtures.Adapter, PeftAdapter.WeightsFile)))
        {
            var tensors = good.Entries.Keys.Order()
                .Select(k => new KeyValuePair<string, Tensor>(k.Replace("base_model.model.", "base_model.model.language_model."), good.Read(k))).ToList();
            SafetensorsWriter.Write(Path.Combine(adapter, PeftAdapter.WeightsFile), tensors);
        }
        var rooted = Merge(Out("rooted"), adapter: adapter);
        Assert.True(rooted.Verify!.Passed, rooted.Verify.ToString());
        Merge(Out("plain"), verify: false);
        using var a = CheckpointFolder.Open(Out("rooted"));
        using var b = CheckpointFolder.Open(Out("plain"));
        foreach (var name in a.Names) Assert.True(Same(a.Read(name), b.Read(name)), name);
    }

    /// <summary>Bit-identical: same dtype, shape and values.</summary>
    private static bool Same(Tensor a, Tensor b) => a.dtype == b.dtype && a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();

    [FixtureFact]
    public void QloraCheckpointMergesIntoTheOriginalWeightsOrIntoTheNf4Ones()
    {
        using var scope = NewDisposeScope();
        using var data = new TrainTestData(samples: 3);
        string checkpoint;
        using (var trainer = new Trainer(data.Config("mode=qlora", "max_steps=2", "lr=0.01", "dataloader_num_workers=0")))
            checkpoint = trainer.Train().LastCheckpoint!;

        var options = new MergeOptions { BaseDir = Fixtures.TinyModel, AdapterDir = checkpoint, OutDir = Out("original"), DType = ScalarType.Float32 };
        var original = ModelMerger.Merge(options);
        var nf4 = ModelMerger.Merge(options with { OutDir = Out("nf4"), MergeIntoNf4 = true });
        Assert.True(original.Verify!.Passed, original.Verify.ToString());
        Assert.True(nf4.Verify!.Passed, nf4.Verify.ToString());

        // The LoRA delta is the same; only the base under it differs: NF4(W) vs W.
        const string decoder = "language_model.model.layers.0.attention.wqkv.weight";
        using (var baseWeights = CheckpointFolder.Open(Fixtures.TinyModel))
        using (var a = CheckpointFolder.Open(Out("original")))
        using (var b = CheckpointFolder.Open(Out("nf4")))
        {
            var w = baseWeights.Read(decoder).to_type(ScalarType.Float32);
            using var q = Nf4.Quantize(w);
            var expected = q.Dequantize(ScalarType.Float32) - w;
            Assert.True(MaxDiff(b.Read(decoder) - a.Read(decoder), expected) <= 1e-5, "nf4 merge = NF4 base + the same delta");
            Assert.True(expected.abs().max().item<float>() > 1e-4);
            Assert.True(Same(a.Read("language_model.output.weight"), b.Read("language_model.output.weight")), "the head is never NF4");
            Assert.False(Same(baseWeights.Read("language_model.output.weight").to_type(ScalarType.Float32), a.Read("language_model.output.weight")), "output LoRA merged");
        }

        // chat --adapter --nf4-base runs the QLoRA forward (NF4 storage) and answers as the NF4-merged folder does.
        var request = new ChatRequest { Question = "Say hello.", Sampling = new SamplingOptions { MaxNewTokens = 6 } };
        using (var qlora = InternVLChat.Load(Fixtures.TinyModel, new ChatLoadOptions { AdapterDir = checkpoint, AdapterNf4Base = true }))
        using (var merged = InternVLChat.Load(Out("nf4")))
        {
            Assert.All(Linear.AllIn(qlora.Model.language_model.LayerStack), l => Assert.NotNull(l.Linear.BaseForward));
            Assert.Equal(merged.Chat(request).TokenIds, qlora.Chat(request).TokenIds);
        }

        // --merge-into-nf4 is for QLoRA checkpoints only.
        string loraCheckpoint;
        using (var trainer = new Trainer(data.Config("mode=lora", "max_steps=1", "dataloader_num_workers=0", $"work_dir={Path.Combine(data.Dir, "lora")}")))
            loraCheckpoint = trainer.Train().LastCheckpoint!;
        var e = Assert.Throws<VlmTuneException>(() => ModelMerger.Merge(options with { AdapterDir = loraCheckpoint, OutDir = Out("refused"), MergeIntoNf4 = true }));
        Assert.Contains("trained in lora mode", e.Message);
        Assert.False(Directory.Exists(Out("refused")));
    }

    private static JsonObject Config(string dir) => JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!.AsObject();
}
