using VlmTune.Training;
using VlmTune.Data;

namespace VlmTune.Tests.Training;

public sealed class TrainConfigTests
{
    private const string Minimal = "model: m\ndata: d.jsonl\n";

    [Fact]
    public void DefaultsFollowTheXtunerRecipe()
    {
        var c = TrainConfig.Parse(Minimal, "configs/clot.yaml");
        Assert.Equal(TrainMode.Qlora, c.Mode);
        Assert.True(c.LlmFrozen);
        Assert.True(c.FreezeVision);
        Assert.False(c.FreezeProjector);
        Assert.Equal((128, 256.0, 0.05), (c.LoraR, c.LoraAlpha, c.LoraDropout));
        Assert.Null(c.LoraTargets);   // the model family's official targets and its head, chosen by the trainer
        Assert.Equal((0.05, 1.0, 0.03), (c.WeightDecay, c.MaxNorm, c.WarmupRatio));
        Assert.Equal((8192, (int?)null, (int?)null), (c.MaxLength, c.MinDynamicPatch, c.MaxDynamicPatch));   // tiling: the model's config.json
        Assert.Equal(Path.Combine("work_dirs", "clot"), c.ResolvedWorkDir);
        Assert.Equal(10, c.LogInterval);
    }

    [Fact]
    public void SetOverridesAnyKeyWithYamlValues()
    {
        var c = TrainConfig.Parse(Minimal, "x.yaml", ["lr=1e-5", "data=[a.jsonl, b.jsonl]", "mode=full", "max_steps=100", "betas=[0.8, 0.95]", "image_root=/imgs", "freeze_vision=false"]);
        Assert.Equal(1e-5, c.Lr);
        Assert.Equal(["a.jsonl", "b.jsonl"], c.Data);
        Assert.Equal(TrainMode.Full, c.Mode);
        Assert.False(c.LlmFrozen);
        Assert.Equal(100, c.MaxSteps);
        Assert.Equal([0.8, 0.95], c.Betas);
        Assert.Equal("/imgs", c.ImageRoot);
        Assert.False(c.FreezeVision);
    }

    [Fact]
    public void EveryProblemIsReportedAtOnceNamingItsKey()
    {
        string yaml = Minimal + "learning_rate: 0.1\nbatch_size: four\nmode: qlora\nfreeze_llm: false\nwarmup_ratio: 2\n";
        var e = Assert.Throws<ConfigException>(() => TrainConfig.Parse(yaml, "bad.yaml", ["max_norm=abc", "nonsense=1"]));
        Assert.Contains("'learning_rate': unknown key", e.Message);
        Assert.Contains("line 3", e.Message);
        Assert.Contains("'batch_size': expected an integer", e.Message);
        Assert.Contains("--set max_norm: expected a number", e.Message);
        Assert.Contains("--set nonsense: unknown key", e.Message);
        Assert.Equal(4, e.Problems.Count);   // value checks run once the types are right
        Assert.StartsWith("bad.yaml", e.Message);

        var combos = Assert.Throws<ConfigException>(() => TrainConfig.Parse(Minimal + "mode: qlora\nfreeze_llm: false\nwarmup_ratio: 2\naccumulative_counts: 4\nsave_steps: 10\n", "bad.yaml"));
        Assert.Contains(combos.Problems, p => p.StartsWith("'freeze_llm'"));
        Assert.Contains(combos.Problems, p => p.StartsWith("'warmup_ratio'"));
        Assert.Contains(combos.Problems, p => p.StartsWith("'save_steps'") && p.Contains("multiple of accumulative_counts"));
        Assert.Equal(3, combos.Problems.Count);

        var vision = Assert.Throws<ConfigException>(() => TrainConfig.Parse(Minimal + "quantize_vision: true\nfreeze_vision: false\n", "v.yaml"));
        Assert.Contains(vision.Problems, p => p.StartsWith("'quantize_vision'") && p.Contains("freeze_vision"));
        Assert.True(TrainConfig.Parse(Minimal + "mode: qlora\nquantize_vision: true\n", "ok.yaml").QuantizeVision);
        var offload = Assert.Throws<ConfigException>(() => TrainConfig.Parse(Minimal + "activation_offload: true\ngradient_checkpointing: false\ndevice: cpu\n", "o.yaml"));
        Assert.Contains(offload.Problems, p => p.StartsWith("'activation_offload'") && p.Contains("gradient_checkpointing"));
        Assert.Contains(offload.Problems, p => p.StartsWith("'activation_offload'") && p.Contains("device cpu"));
    }

    [Fact]
    public void UnknownKeysSuggestTheClosestOne()
    {
        var e = Assert.Throws<ConfigException>(() => TrainConfig.Parse(Minimal + "max_step: 3\n", "x.yaml"));
        Assert.Contains("did you mean 'max_steps'", e.Message);
    }

    [Fact]
    public void ScheduleWarmsUpLinearlyFromATinyFactorThenFollowsACosine()
    {
        var s = new LrSchedule(1e-4, 1000, 0.03);
        Assert.Equal(30, s.WarmupIterations);
        Assert.Equal(1e-9, s.At(0), 15);
        Assert.Equal(1e-4 * (1e-5 + (1 - 1e-5) * 15 / 30.0), s.At(15), 15);
        Assert.Equal(1e-4, s.At(30), 15);
        Assert.Equal(0.5e-4, s.At(30 + 485), 12);
        Assert.True(s.At(999) < 1e-8);
        for (long i = 31; i < 1000; i++) Assert.True(s.At(i) <= s.At(i - 1));
    }

    [Fact]
    public void LengthGroupedOrderIsAPermutationOfSortedMegaBatchesWithTheLongestFirst()
    {
        var rng = new Random(3);
        var lengths = Enumerable.Range(0, 200).Select(i => (long)(rng.Next(10, 3000) * (i % 4 == 0 ? -1 : 1))).ToList();
        var order = LengthGroupedSampler.Order(lengths, 4, 42, 0);
        Assert.Equal(Enumerable.Range(0, 200).Select(i => (long)i), order.Order());
        Assert.Equal(lengths.Max(Math.Abs), Math.Abs(lengths[(int)order[0]]));
        int group = LengthGroupedSampler.GroupBatchSize(200, 4);
        Assert.Equal(48, group);
        // Every full mega-batch holds one modality only, sorted longest first (apart from the swapped head).
        for (int start = 0; start + group <= order.Length - group; start += group)
        {
            var chunk = order.Skip(start).Take(group).Skip(1).ToList();   // the head may be the swapped-in longest sample
            Assert.True(chunk.All(i => lengths[(int)i] > 0) || chunk.All(i => lengths[(int)i] < 0), $"mixed modalities at {start}");
            var tail = chunk.Select(i => Math.Abs(lengths[(int)i])).ToList();
            Assert.Equal(tail.OrderDescending(), tail);
        }
        Assert.Equal(order, LengthGroupedSampler.Order(lengths, 4, 42, 0));
        Assert.NotEqual(order, LengthGroupedSampler.Order(lengths, 4, 42, 1));
    }
}
