using VlmTune.Autograd;
using VlmTune.Checkpoints;
using VlmTune.Models;
using VlmTune.Tests.Support;
using VlmTune.Training;
using static TorchSharp.torch;

namespace VlmTune.Tests.Training;

/// <summary>The fixture PEFT adapter reproduces the official LoRA loss, LoRA gradients and merged logits.</summary>
public sealed class LoraGoldenTests
{
    [FixtureTheory]
    [InlineData(false, 4096L, false)]
    [InlineData(true, 7L, false)]
    [InlineData(true, 4096L, true)]    // checkpointed inputs kept in host memory (activation_offload)
    public void AdapterLossAndGradientsMatchGolden(bool checkpointing, long chunk, bool offload)
    {
        using var scope = NewDisposeScope();
        using var model = GoldenSample.FreshModel();
        var config = PeftAdapter.Load(model.language_model, Fixtures.Adapter);
        Assert.Equal(8, config.R);
        Assert.Equal(2.0, config.Scaling);
        ActivationCheckpointing.Apply(model.language_model, checkpointing, new DropoutSeeds(0), offloadInputs: offload);

        var hidden = GoldenSample.Hidden(model);
        var (loss, tokens) = CausalLmLoss.Compute(hidden, tensor(GoldenSample.Labels).unsqueeze(0), model.language_model.OutputHead, chunk);
        loss.backward();
        BackwardScratch.Release();

        var lora = Fixtures.Golden.GetProperty("lora");
        double golden = lora.GetProperty("loss").GetDouble();
        double actual = loss.item<float>();
        Assert.True(Math.Abs(actual - golden) / golden <= 1e-4, $"loss {actual} vs golden {golden}");
        Assert.Equal(GoldenSample.Labels.Skip(1).Count(l => l != -100), tokens);

        int compared = 0;
        foreach (var (name, linear) in PeftAdapter.LoraLinears(model.language_model))
        {
            foreach (var (part, p) in new[] { ("lora_A", linear.lora_A!.weight), ("lora_B", linear.lora_B!.weight) })
            {
                var expected = Fixtures.GoldenTensors.Read($"lora_grad.base_model.model.{name}.{part}.default.weight");
                var grad = p.grad!;
                double rel = (grad - expected).norm().item<float>() / expected.norm().item<float>();
                Assert.True(rel <= 1e-3, $"{name}.{part}: relative gradient error {rel:g3}");
                compared++;
            }
        }
        Assert.Equal(20, compared);
    }

    [FixtureFact]
    public void ChunkedLossFreesEachChunksLogitsBeforeTheNext()
    {
        using var scope = NewDisposeScope();
        using var model = GoldenSample.FreshModel();
        using var _ = no_grad();
        var hidden = GoldenSample.Hidden(model)[0];                            // (T, D)
        var labels = tensor(GoldenSample.Labels);
        long before = TorchSharp.DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        var sum = CausalLmLoss.DirectSum(hidden, labels, model.language_model.OutputHead, chunkSize: 1);   // one chunk per row
        long left = TorchSharp.DisposeScopeManager.Statistics.ThreadTotalLiveCount - before;
        // Only the running sum survives; per-chunk logits held to the end would be (T, V) fp32 in all.
        Assert.True(left <= 2, $"{left} tensors left alive by {hidden.shape[0]} chunks");
        Assert.True(sum.item<float>() > 0);
    }

    [FixtureFact]
    public void ChunkedLossEqualsUnchunkedCrossEntropy()
    {
        using var scope = NewDisposeScope();
        using var model = GoldenSample.FreshModel();
        using var _ = no_grad();
        var hidden = GoldenSample.Hidden(model);
        var labels = tensor(GoldenSample.Labels);
        var logits = model.language_model.Logits(hidden)[0];
        double whole = nn.functional.cross_entropy(logits[..^1], labels[1..], ignore_index: -100).item<float>();
        foreach (long chunk in new long[] { 1, 5, 64, 100000 })
        {
            double chunked = CausalLmLoss.Compute(hidden, labels.unsqueeze(0), model.language_model.OutputHead, chunk).Loss.item<float>();
            Assert.True(Math.Abs(chunked - whole) <= 1e-5 * whole, $"chunk {chunk}: {chunked} vs {whole}");
        }
        double golden = Fixtures.Golden.GetProperty("train_sample").GetProperty("loss").GetDouble();
        Assert.True(Math.Abs(whole - golden) / golden <= 1e-4, $"base loss {whole} vs golden {golden}");
    }

    [FixtureFact]
    public void MergedModelGivesUnmergedAndGoldenLogits()
    {
        using var scope = NewDisposeScope();
        using var model = GoldenSample.FreshModel();
        PeftAdapter.Load(model.language_model, Fixtures.Adapter);
        using var _ = no_grad();
        var before = model.language_model.Logits(GoldenSample.Hidden(model))[0];
        Assert.Equal(10, LoraMerge.MergeInto(model.language_model));
        Assert.Empty(PeftAdapter.LoraLinears(model.language_model));
        Assert.DoesNotContain(model.language_model.named_parameters(), p => p.name.Contains("lora_"));
        var after = model.language_model.Logits(GoldenSample.Hidden(model))[0];

        Assert.True((after - before).abs().max().item<float>() <= 1e-4);
        var last = Fixtures.GoldenTensors.Read("merged_logits_last");
        var lse = Fixtures.GoldenTensors.Read("merged_lse");
        Assert.True((after[^4..] - last).abs().max().item<float>() <= 2e-4, "merged logits vs golden");
        Assert.True((after.logsumexp(-1) - lse).abs().max().item<float>() <= 2e-4, "merged lse vs golden");
    }

    [FixtureFact]
    public void MergeRefusesNonFiniteAdapters()
    {
        using var model = GoldenSample.FreshModel();
        PeftAdapter.Load(model.language_model, Fixtures.Adapter);
        var first = PeftAdapter.LoraLinears(model.language_model).First().Linear;
        using (no_grad()) first.lora_B!.weight[0, 0] = float.NaN;
        var before = first.weight.clone();
        var e = Assert.Throws<VlmTuneException>(() => LoraMerge.MergeInto(model.language_model));
        Assert.Contains("non-finite", e.Message);
        Assert.True(first.HasLora);
        Assert.True(before.allclose(first.weight, 0, 0), "a refused merge leaves the weights as they were");
    }

    [FixtureFact]
    public void SavedAdapterRoundTripsInPeftFormat()
    {
        using var scope = NewDisposeScope();
        using var model = GoldenSample.FreshModel();
        var config = PeftAdapter.Load(model.language_model, Fixtures.Adapter);
        string dir = Path.Combine(Path.GetTempPath(), "vlmtune-peft-" + Guid.NewGuid().ToString("N"));
        try
        {
            PeftAdapter.Save(model.language_model, dir, config with { BaseModelNameOrPath = "tiny" });
            using var original = SafetensorsFile.Open(Path.Combine(Fixtures.Adapter, PeftAdapter.WeightsFile));
            using var saved = SafetensorsFile.Open(Path.Combine(dir, PeftAdapter.WeightsFile));
            Assert.Equal(original.Entries.Keys.Order(), saved.Entries.Keys.Order());
            Assert.Equal("pt", saved.Metadata["format"]);
            foreach (var name in original.Entries.Keys)
                Assert.True(original.Read(name).allclose(saved.Read(name), 0, 0), name);
            var reread = PeftAdapterConfig.Load(Path.Combine(dir, PeftAdapter.ConfigFile));
            Assert.Equal(config.R, reread.R);
            Assert.Equal(config.LoraAlpha, reread.LoraAlpha);
            Assert.Equal(config.TargetModules.Order(), reread.TargetModules.Order());
            var json = System.Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, PeftAdapter.ConfigFile))).RootElement;
            Assert.Equal("LORA", json.GetProperty("peft_type").GetString());
            Assert.Equal("CAUSAL_LM", json.GetProperty("task_type").GetString());
            Assert.Equal("none", json.GetProperty("bias").GetString());
            Assert.Equal(16, json.GetProperty("lora_alpha").GetInt32());

            using var again = GoldenSample.FreshModel();
            PeftAdapter.Load(again.language_model, dir);
            var a = PeftAdapter.LoraLinears(model.language_model).ToList();
            var b = PeftAdapter.LoraLinears(again.language_model).ToList();
            Assert.Equal(a.Select(x => x.Name), b.Select(x => x.Name));
            for (int i = 0; i < a.Count; i++)
                Assert.True(a[i].Linear.lora_B!.weight.allclose(b[i].Linear.lora_B!.weight, 0, 0));
            Assert.Empty(Directory.GetFiles(dir, "*.tmp-*"));
        }
        finally { Directory.Delete(dir, true); }
    }

    [FixtureFact]
    public void MismatchedAdapterIsRejectedNamingTensors()
    {
        string dir = Path.Combine(Path.GetTempPath(), "vlmtune-peft-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            File.WriteAllText(Path.Combine(dir, PeftAdapter.ConfigFile), """{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["wqkv"],"use_dora":true}""");
            using var model = GoldenSample.FreshModel();
            var e = Assert.Throws<CheckpointException>(() => PeftAdapter.Load(model.language_model, dir));
            Assert.Contains("use_dora", e.Message);

            File.WriteAllText(Path.Combine(dir, PeftAdapter.ConfigFile), """{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["attention.wqkv"]}""");
            File.Copy(Path.Combine(Fixtures.Adapter, PeftAdapter.WeightsFile), Path.Combine(dir, PeftAdapter.WeightsFile));
            e = Assert.Throws<CheckpointException>(() => PeftAdapter.Load(model.language_model, dir));
            Assert.Contains("shape", e.Message);
            Assert.Contains("feed_forward.w1", e.Message);   // tensors of modules not targeted are named too
            Assert.Empty(PeftAdapter.LoraLinears(model.language_model));
        }
        finally { Directory.Delete(dir, true); }
    }

    [FixtureTheory]
    [InlineData("[\"wqkv\", \"output\"]", 3)]                       // suffix match: 2 layers' wqkv + the head
    [InlineData("\"model\\\\.layers\\\\.1\\\\..*\"", 5)]       // a string is a regex over the whole name
    [InlineData("\"all-linear\"", 10)]                                 // every linear but the output head
    public void TargetModulesFollowPeftMatching(string targets, int expected)
    {
        string dir = Path.Combine(Path.GetTempPath(), "vlmtune-peft-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            File.WriteAllText(Path.Combine(dir, PeftAdapter.ConfigFile), $$"""{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":{{targets}}}""");
            var config = PeftAdapterConfig.Load(Path.Combine(dir, PeftAdapter.ConfigFile));
            using var model = GoldenSample.FreshModel();
            Assert.Equal(expected, PeftAdapter.Attach(model.language_model, config).Count);
        }
        finally { Directory.Delete(dir, true); }
    }
}
