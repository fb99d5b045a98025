using VlmTune.Autograd;
using VlmTune.Checkpoints;
using VlmTune.Models;
using VlmTune.Tests.Support;
using VlmTune.Training;
using static TorchSharp.torch;
using VlmTune.Data;

namespace VlmTune.Tests.Training;

/// <summary>
/// Sequence packing (pack_to_max_length): the next-fit packer, packed rows through the decoder (positions restart,
/// attention never crosses samples) and packed training against unpacked training of the same micro-batches.
/// </summary>
[Collection(GlobalTorchRng.Name)]
public sealed class SequencePackingTests
{
    [Fact]
    public void NextFitKeepsTheSamplerOrderAndNeverSplitsASample()
    {
        (string, int)[] samples = [("a", 5), ("b", 4), ("c", 2), ("d", 8), ("e", 1), ("f", 1)];
        var rows = SequencePacker.Rows(samples, 8);
        Assert.Equal([[0], [1, 2], [3], [4, 5]], rows.Select(r => r.ToList()));
        Assert.Equal([[0, 1, 2], [3, 4, 5]], SequencePacker.Rows(samples, 11).Select(r => r.ToList()));
        Assert.Equal([[0, 1, 2, 3, 4, 5]], SequencePacker.Rows(samples, 21).Select(r => r.ToList()));
        Assert.Empty(SequencePacker.Rows([], 8));
    }

    [Fact]
    public void TheRowCapacityIsTheOneThatLeavesTheLeastPadding()
    {
        // Filling rows up to 1024 would give 900 + 300, padded to 2 × 900; two rows of 600 pad nothing.
        Assert.Equal([[0, 1], [2, 3]], SequencePacker.Rows([("a", 300), ("b", 300), ("c", 300), ("d", 300)], 1024).Select(r => r.ToList()));
        Assert.Equal([[0, 1, 2, 3]], SequencePacker.Rows([("a", 300), ("b", 290), ("c", 30), ("d", 20)], 1024).Select(r => r.ToList()));

        var random = new Random(5);
        for (int trial = 0; trial < 300; trial++)
        {
            int max = random.Next(50, 400);
            var samples = Enumerable.Range(0, random.Next(1, 20)).Select(i => ($"s{i}", random.Next(1, max + 1))).ToList();
            var rows = SequencePacker.Rows(samples, max);
            Assert.Equal(Enumerable.Range(0, samples.Count), rows.SelectMany(r => r));   // every sample once, in order
            var totals = rows.Select(r => r.Sum(i => samples[i].Item2)).ToList();
            Assert.All(totals, t => Assert.InRange(t, 1, max));
            long packedSlots = (long)rows.Count * totals.Max(), unpackedSlots = (long)samples.Count * samples.Max(x => x.Item2);
            Assert.True(packedSlots <= unpackedSlots, $"trial {trial}: packing padded more ({packedSlots} > {unpackedSlots} slots)");
        }
    }

    [Fact]
    public void ASampleLongerThanARowIsAnErrorNamingTheSamplesAndMaxLength()
    {
        var e = Assert.Throws<VlmTuneException>(() => SequencePacker.Rows([("s1", 5), ("s2", 12), ("s3", 9)], 8));
        Assert.Contains("s2 (12 tokens), s3 (9 tokens)", e.Message);
        Assert.Contains("max_length 8", e.Message);
        Assert.DoesNotContain("s1", e.Message);

        // Through collation, with the samples' ids.
        using var sample = new EncodedSample("long-one", [1, 2, 3, 4, 5], [-100, -100, 3, 4, 5], null, 0);
        e = Assert.Throws<VlmTuneException>(() => TrainBatch.Collate(0, [sample], 0, 2, packTokens: 4));
        Assert.Contains("long-one (5 tokens)", e.Message);
    }

    [Fact]
    public void PackedCollationLaysSamplesBackToBackAndMasksEachFirstLabel()
    {
        using var a = new EncodedSample("a", [1, 10, 11], [-100, 10, 11], null, 0);
        using var b = new EncodedSample("b", [1, 20], [20, 21], null, 0);      // a first label that is supervised
        using var c = new EncodedSample("c", [1, 30, 31, 32], [-100, -100, 31, 32], null, 0);
        using var batch = TrainBatch.Collate(3, [a, b, c], 1, padId: 2, packTokens: 5);
        Assert.Equal(new long[] { 2, 5 }, batch.InputIds.shape);
        Assert.Equal(new long[] { 1, 10, 11, 1, 20, 1, 30, 31, 32, 2 }, batch.InputIds.data<long>().ToArray());
        // b's first label would be the target of a's last token: packed, as unpacked, nothing predicts a first token.
        Assert.Equal(new long[] { -100, 10, 11, -100, 21, -100, -100, 31, 32, -100 }, batch.Labels.data<long>().ToArray());
        Assert.Equal(2, batch.Packing!.Rows);
        Assert.Equal([[3, 2], [4]], batch.Packing.SampleLengths.Select(r => r.ToList()));
        Assert.Equal(new long[] { 0, 1, 2, 0, 1, 0, 1, 2, 3, 0 }, batch.Packing.PositionIds(CPU).data<long>().ToArray());
        Assert.Equal(9, batch.Tokens);
        Assert.Equal(["a", "b", "c"], batch.SampleIds);

        using var unpacked = TrainBatch.Collate(3, [a, b, c], 1, padId: 2);
        Assert.Null(unpacked.Packing);
        Assert.Equal(new long[] { 3, 4 }, unpacked.InputIds.shape);

        // pad_to_multiple_of rounds the row length up, padded rows and packed ones alike, after the samples.
        using var rounded = TrainBatch.Collate(3, [a, b, c], 1, padId: 2, padMultiple: 8);
        Assert.Equal(new long[] { 3, 8 }, rounded.InputIds.shape);
        Assert.Equal(new long[] { 1, 20, 2, 2, 2, 2, 2, 2 }, rounded.InputIds[1].data<long>().ToArray());
        Assert.Equal(new long[] { 20, 21, -100, -100, -100, -100, -100, -100 }, rounded.Labels[1].data<long>().ToArray());
        Assert.Equal(9, rounded.Tokens);   // real tokens only
        using var packedRounded = TrainBatch.Collate(3, [a, b, c], 1, padId: 2, packTokens: 5, padMultiple: 8);
        Assert.Equal(new long[] { 2, 8 }, packedRounded.InputIds.shape);
        Assert.Equal(8, packedRounded.Packing!.RowLength);
    }

    [Fact]
    public void PadToMultipleOfDefaultsTo64OnCudaAndOffOnTheCpu()
    {
        const string minimal = "model: m\ndata: d.jsonl\n";
        var defaults = TrainConfig.Parse(minimal, "x.yaml");
        Assert.Null(defaults.PadToMultipleOf);
        Assert.Equal(64, defaults.PadMultiple(cuda: true));
        Assert.Equal(1, defaults.PadMultiple(cuda: false));
        var eight = TrainConfig.Parse(minimal + "pad_to_multiple_of: 8\n", "x.yaml");
        Assert.Equal(8, eight.PadMultiple(cuda: true));
        Assert.Equal(8, eight.PadMultiple(cuda: false));
        Assert.Equal(8, TrainConfig.Parse(eight.Resolved().ToYaml(), "resolved.yaml").PadToMultipleOf);
        var e = Assert.Throws<ConfigException>(() => TrainConfig.Parse(minimal + "pad_to_multiple_of: 0\n", "bad.yaml"));
        Assert.Contains("'pad_to_multiple_of': must be at least 1 (got 0)", e.Message);
    }

    /// <summary>
    /// Three samples whose packed row (a + b) is longer than the tiny model's max_position_embeddings (512) while each
    /// is shorter: a RoPE base taken from the row length would change every logit, so this also pins the base to the
    /// longest sample. c shares no row (the second row is c then padding).
    /// </summary>
    [FixtureTheory]
    [InlineData(AttentionKind.Sdpa)]
    [InlineData(AttentionKind.Exact)]
    public void PackedRowsGiveEachSampleTheHiddenStatesAndLogitsItGetsAlone(AttentionKind kind)
    {
        using var model = InternVLModelLoader.Load(Fixtures.TinyModel, new ModelOptions { Attention = kind });
        var lm = model.language_model;
        var generator = new Generator(11);
        var samples = new[] { 300, 250, 40 }.Select(n => randint(3, 90000, [n], generator: generator)).ToArray();   // a, b, c
        var packing = new PackedRows([[300, 250], [40]], 550);

        Tensor Packed(Tensor[] s)
        {
            var ids = stack([cat([s[0], s[1]]), cat([s[2], full(510, 2L)])]);               // (2, 550)
            return lm.Forward(lm.Embed(ids), new DecoderInputs { Packing = packing });        // (2, 550, D)
        }
        using var _ = no_grad();
        var packed = Packed(samples);
        var alone = samples.Select(s => lm.Forward(lm.Embed(s.unsqueeze(0)), new DecoderInputs())[0]).ToArray();
        Tensor[] slices = [packed[0, ..300], packed[0, 300..550], packed[1, ..40]];
        for (int i = 0; i < 3; i++)
        {
            double diff = (slices[i] - alone[i]).abs().max().item<float>();
            Assert.True(diff < 1e-5, $"{kind}: sample {"abc"[i]} differs from its lone run by {diff}");
            var logitsPacked = lm.Logits(slices[i][^8..]);
            var logitsAlone = lm.Logits(alone[i][^8..]);
            double logitDiff = (logitsPacked - logitsAlone).abs().max().item<float>();
            Assert.True(logitDiff < 1e-5 * Math.Max(1, logitsAlone.abs().max().item<float>()), $"{kind}: sample {"abc"[i]} logits differ by {logitDiff}");
        }
        Assert.True(packed[1, 40..].isfinite().all().item<bool>(), "the padding tail stays finite");

        // Attention never crosses samples: new tokens for a leave b (same row, after it) and c untouched.
        var perturbed = samples.ToArray();
        perturbed[0] = randint(3, 90000, [300], generator: generator);
        var again = Packed(perturbed);
        Assert.True((again[0, ..300] - packed[0, ..300]).abs().max().item<float>() > 1e-3, "a's own states change");
        Assert.True((again[0, 300..550] - packed[0, 300..550]).abs().max().item<float>() < 1e-6, "b must not see a");
        Assert.True((again[1] - packed[1]).abs().max().item<float>() < 1e-6, "c must not see a");
    }

    /// <summary>
    /// Two image samples (different pictures, so their tiles' order matters) around a text-only one, with the fixture
    /// LoRA adapter and a trainable projector: the packed micro-batch (one row of ~650 tokens, past the 512 positions)
    /// gives the unpacked loss and every LoRA and projector gradient.
    /// </summary>
    [FixtureTheory]
    [InlineData(false)]
    [InlineData(true)]
    public void PackedMicroBatchGivesTheUnpackedLossAndGradients(bool checkpointing)
    {
        using var scope = NewDisposeScope();
        using var model = InternVLModelLoader.Load(Fixtures.TinyModel, new ModelOptions());
        foreach (var p in model.parameters()) p.requires_grad_(false);
        PeftAdapter.Load(model.language_model, Fixtures.Adapter);
        foreach (var (name, p) in model.named_parameters())
            if (name.Contains(".lora_") || name.StartsWith("mlp1.", StringComparison.Ordinal)) p.requires_grad_(true);
        ActivationCheckpointing.Apply(model.language_model, checkpointing, new DropoutSeeds(0));
        var trainable = model.named_parameters().Where(p => p.parameter.requires_grad).ToList();

        int[] ids = GoldenSample.InputIds.Select(x => (int)x).ToArray(), labels = GoldenSample.Labels.Select(x => (int)x).ToArray();
        var pixels = Fixtures.GoldenTensors.Read("pixel_values.clot");
        var text = randint(3, 90000, [60], generator: new Generator(3)).data<long>().Select(x => (int)x).ToArray();
        using var first = new EncodedSample("img-a", ids, labels, pixels, 1);
        using var middle = new EncodedSample("text", text, text.Select((x, i) => i is > 0 and < 20 ? -100 : x).ToArray(), null, 0);
        using var last = new EncodedSample("img-b", ids, labels, pixels.flip(3), 1);
        EncodedSample[] samples = [first, middle, last];   // the text's first label is supervised: packing must mask it

        (double Loss, long Tokens, Dictionary<string, Tensor> Grads) Run(TrainBatch batch)
        {
            var features = model.ExtractFeatures(batch.Pixels!, visionGrad: false);
            var embeds = model.EmbedWithImages(batch.InputIds, features, GoldenSample.ImageContextId);
            var hidden = model.language_model.Forward(embeds, new DecoderInputs { Packing = batch.Packing });
            var (loss, tokens) = CausalLmLoss.Compute(hidden, batch.Labels, model.language_model.OutputHead, 64);
            loss.backward();
            BackwardScratch.Release();
            var grads = trainable.ToDictionary(p => p.name, p => p.parameter.grad!.clone());
            foreach (var (_, p) in trainable) p.grad!.zero_();
            return (loss.item<float>(), tokens, grads);
        }

        using var unpackedBatch = TrainBatch.Collate(0, samples, 0, padId: 2);
        using var packedBatch = TrainBatch.Collate(0, samples, 0, padId: 2, packTokens: 1024);
        Assert.Equal(1, packedBatch.Packing!.Rows);
        Assert.True(packedBatch.InputIds.shape[1] > 512);
        // pad_to_multiple_of: rows rounded up to 64 tokens with padding after the samples, which no real token sees.
        using var roundedBatch = TrainBatch.Collate(0, samples, 0, padId: 2, padMultiple: 64);
        Assert.Equal(0, roundedBatch.InputIds.shape[1] % 64);
        Assert.True(roundedBatch.InputIds.shape[1] > unpackedBatch.InputIds.shape[1]);
        var unpacked = Run(unpackedBatch);
        var packed = Run(packedBatch);
        var rounded = Run(roundedBatch);
        Assert.Equal(unpacked.Tokens, rounded.Tokens);
        Assert.True(Math.Abs(rounded.Loss - unpacked.Loss) <= 1e-5 * unpacked.Loss, $"loss: rounded rows {rounded.Loss} vs unpadded {unpacked.Loss}");
        foreach (var (name, expected) in unpacked.Grads)
        {
            double rel = (rounded.Grads[name] - expected).norm().item<float>() / expected.norm().item<float>();
            Assert.True(rel <= 1e-5, $"{name}: rounded rows' relative gradient difference {rel:g3}");
        }

        Assert.Equal(unpacked.Tokens, packed.Tokens);
        Assert.True(Math.Abs(packed.Loss - unpacked.Loss) <= 1e-5 * unpacked.Loss, $"loss: packed {packed.Loss} vs unpacked {unpacked.Loss}");
        Assert.Equal(26, unpacked.Grads.Count);   // 10 LoRA linears × (A, B) + mlp1's 6 tensors
        foreach (var (name, expected) in unpacked.Grads)
        {
            double rel = (packed.Grads[name] - expected).norm().item<float>() / expected.norm().item<float>();
            Assert.True(rel <= 1e-5, $"{name}: relative gradient difference {rel:g3}");
        }
    }

    [Fact]
    public void PackToMaxLengthIsABooleanOffByDefaultAndReadsBack()
    {
        const string minimal = "model: m\ndata: d.jsonl\n";
        Assert.False(TrainConfig.Parse(minimal, "x.yaml").PackToMaxLength);
        var on = TrainConfig.Parse(minimal + "pack_to_max_length: true\n", "x.yaml");
        Assert.True(on.PackToMaxLength);
        Assert.True(TrainConfig.Parse(on.Resolved().ToYaml(), "resolved.yaml").PackToMaxLength);

        var e = Assert.Throws<ConfigException>(() => TrainConfig.Parse(minimal + "pack_to_max_length: sometimes\n", "bad.yaml", ["pack_to_max_length=2"]));
        Assert.Contains("line 3: 'pack_to_max_length': expected true or false, got 'sometimes'", e.Message);
        Assert.Contains("--set pack_to_max_length: expected true or false, got '2'", e.Message);
        var typo = Assert.Throws<ConfigException>(() => TrainConfig.Parse(minimal + "pack_to_max_len: true\n", "bad.yaml"));
        Assert.Contains("did you mean 'pack_to_max_length'", typo.Message);
    }

    [Fact]
    public void PositionIdsRestartForEverySampleAndOverThePadding()
    {
        var rows = new PackedRows([[2, 3], [1, 1, 1]], 6);
        Assert.Equal(new long[] { 0, 1, 0, 1, 2, 0, 0, 0, 0, 0, 1, 2 }, rows.PositionIds(CPU).data<long>().ToArray());
        Assert.Equal(3, rows.LongestSample);
        Assert.Equal(5, rows.Samples);
        Assert.Throws<ArgumentException>(() => new PackedRows([[4, 3]], 6));
    }

    /// <summary>
    /// Attention regroups packed rows as one right-padded sample per row (Attention.ComputePacked): the gather lists each
    /// sample's slots then repeats slot 0 up to the longest sample; the scatter sends every slot back, padding to the
    /// zero row one past the samples. Made once per device and batch: every layer reads the same tensors.
    /// </summary>
    [Fact]
    public void AttentionRegroupsPackedRowsAsSamplesPaddedToTheLongest()
    {
        using var rows = new PackedRows([[2, 3], [1, 1, 1]], 6);
        var (gather, scatter) = rows.AttentionIndex(CPU);
        Assert.Equal(new long[] { 0, 1, 0, /**/ 2, 3, 4, /**/ 6, 0, 0, /**/ 7, 0, 0, /**/ 8, 0, 0 }, gather.data<long>().ToArray());
        Assert.Equal(new long[] { 0, 1, 3, 4, 5, 15, /**/ 6, 9, 12, 15, 15, 15 }, scatter.data<long>().ToArray());
        Assert.Same(gather, rows.AttentionIndex(CPU).Gather);
    }

    [FixtureFact]
    public void PackedTrainingFollowsUnpackedTrainingWithImages()
    {
        using var data = new TrainTestData(samples: 12);
        // Unsorted batches mix ~300-token image samples with ~50-token text ones: packing has padding to save.
        string[] settings = ["batch_size=4", "max_steps=4", "accumulative_counts=2", "log_interval=1", "dataloader_num_workers=1", "group_by_length=false"];
        TrainResult unpacked, packed;
        using (var trainer = new Trainer(data.Config([.. settings, $"work_dir={Path.Combine(data.Dir, "unpacked")}"])))
            unpacked = trainer.Train();
        using (var trainer = new Trainer(data.Config([.. settings, "pack_to_max_length=true", $"work_dir={Path.Combine(data.Dir, "packed")}"])))
            packed = trainer.Train();

        string log = File.ReadAllText(Directory.GetFiles(packed.RunDir, "*.log").Single());
        Assert.Matches(@"packing: the 4 samples of each micro-batch share rows of at most max_length 1024 tokens; epoch 1: [\d.]+ rows per micro-batch, padding [\d.]+% of the token slots \(unpacked [\d.]+%\)", log);
        // Some micro-batch shares a row between samples, and rows longer than the tiny model's 512 positions (dynamic NTK).
        var lines = System.Text.RegularExpressions.Regex.Matches(log, @"dynamic token length: (?<t>\d+), packed rows: (?<r>\d+)");
        Assert.Equal(4, lines.Count);
        Assert.Contains(lines, m => int.Parse(m.Groups["r"].Value) < 4);
        Assert.Contains(lines, m => int.Parse(m.Groups["t"].Value) > 512);
        Assert.DoesNotContain("packed rows", File.ReadAllText(Directory.GetFiles(unpacked.RunDir, "*.log").Single()));

        Assert.Equal(4, packed.Losses.Count);
        for (int i = 0; i < 4; i++)
            Assert.True(Math.Abs(packed.Losses[i] - unpacked.Losses[i]) <= 1e-5 * Math.Abs(unpacked.Losses[i]),
                $"iteration {i + 1}: packed loss {packed.Losses[i]} vs unpacked {unpacked.Losses[i]}");

        // The gradients agree (their norm before clipping, logged at each optimizer step) ...
        var gradNorms = new[] { unpacked, packed }.Select(r => File.ReadAllLines(Path.Combine(r.RunDir, "vis_data", "scalars.json"))
            .Select(l => System.Text.Json.JsonDocument.Parse(l).RootElement.GetProperty("grad_norm"))
            .Where(g => g.ValueKind == System.Text.Json.JsonValueKind.Number).Select(g => g.GetDouble()).ToList()).ToList();
        Assert.Equal(3, gradNorms[0].Count);   // iteration 1 precedes the first step
        for (int i = 0; i < 3; i++)
            Assert.True(Math.Abs(gradNorms[1][i] - gradNorms[0][i]) <= 1e-5 * gradNorms[0][i], $"grad norm {i}: packed {gradNorms[1][i]} vs unpacked {gradNorms[0][i]}");

        // ... and so do the adapters after two AdamW steps. (AdamW's first step is g / (|g| + ε): entries whose
        // gradient is near zero move by ±lr either way, so rounding-level differences show more here than above.)
        using var a = SafetensorsFile.Open(Path.Combine(unpacked.LastCheckpoint!, PeftAdapter.WeightsFile));
        using var b = SafetensorsFile.Open(Path.Combine(packed.LastCheckpoint!, PeftAdapter.WeightsFile));
        Assert.Equal(a.Entries.Keys.Order(), b.Entries.Keys.Order());
        foreach (var name in a.Entries.Keys)
        {
            using var x = a.Read(name);
            using var y = b.Read(name);
            double diff = (x - y).norm().item<float>(), scale = x.norm().item<float>();
            Assert.True(diff <= 1e-4 * scale, $"{name}: relative difference {diff / scale}");
        }
    }
}
