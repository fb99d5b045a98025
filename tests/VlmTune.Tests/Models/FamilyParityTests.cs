using TorchSharp;
using VlmTune.Autograd;
using VlmTune.Checkpoints;
using VlmTune.Inference;
using VlmTune.Models;
using VlmTune.Tests.Support;
using VlmTune.Training;
using static TorchSharp.torch;

namespace VlmTune.Tests.Models;

/// <summary>
/// Parity of every LLM family with goldens of the official InternVL code (tools/make_family_goldens.py; CPU, fp32 maths
/// on bf16-stored weights, eager attention): the vision side (our image pipeline, ViT and projector against the
/// official features), then the LLM on the official features: logits, per-position logsumexp and argmax of the first
/// pass, greedy ids with the KV cache, and for the Qwen families the LoRA loss, gradients and merged logits of a PEFT
/// adapter. The variants cover 1 (qwen2), 3 (llama), 4 (phi3), 6 (llama_g6) and 8 (qwen3) query heads per KV head;
/// the InternLM2 fixture covers 2.
/// </summary>
public sealed class FamilyParityTests
{
    private const double Tol = 2e-3;

    public static TheoryData<string, string> Cases()
    {
        var data = new TheoryData<string, string>();
        foreach (var v in Variants)
            foreach (var c in new[] { "one_image", "text_only", "two_images", "multi_turn" })
                data.Add(v, c);
        data.Add("phi3", "long_text");   // past original_max_position_embeddings: longrope's long factors
        return data;
    }

    private static readonly string[] Variants = ["qwen2", "qwen3", "llama", "llama_g6", "phi3"];

    public static TheoryData<string, string> Images()
    {
        var data = new TheoryData<string, string>();
        foreach (var v in Variants)
            foreach (var image in new[] { "clot", "tie", "tiny" })
                data.Add(v, image);
        return data;
    }

    /// <summary>Decoded, tiled and normalised by our pipeline, through the ViT (300M or 6B style) and mlp1.</summary>
    [FixtureTheory]
    [MemberData(nameof(Images))]
    public void VisionFeaturesMatchGolden(string variant, string image)
    {
        using var scope = NewDisposeScope();
        using var model = Load(variant);
        using var noGrad = no_grad();
        var features = model.ExtractFeatures(Pixels(variant, [image]));
        // JPEG decoders may differ by one level in a few pixels (clot.jpg); the PNGs decode exactly.
        ModelParityTests.AssertClose(FamilyFixtures.GoldenTensors(variant).Read($"vit_features.{image}"), features, image == "clot" ? 2e-2 : Tol);
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void FirstPassLogitsMatchGolden(string variant, string caseName)
    {
        using var scope = NewDisposeScope();
        using var model = Load(variant);
        var golden = FamilyFixtures.GoldenTensors(variant);
        var ids = PromptIds(variant, caseName);
        var features = Features(model, variant, caseName);
        using var noGrad = no_grad();
        var embeds = model.EmbedWithImages(tensor(ids).unsqueeze(0), features, ImageContextId(variant));
        var logits = model.language_model.Logits(model.language_model.Forward(embeds, new DecoderInputs()))[0];   // (T, V)
        ModelParityTests.AssertClose(golden.Read($"logits_last.{caseName}"), logits[^1..], Tol);
        ModelParityTests.AssertClose(golden.Read($"lse.{caseName}"), logits.logsumexp(-1), Tol);
        // Argmax must agree wherever the choice is clear: among ~150k nearly flat logits of a random model, positions
        // whose top two are within 1e-3 are ties that fp32 summation order may flip.
        var expected = golden.Read($"argmax.{caseName}");
        var top2 = logits.topk(2).values;                                                        // (T, 2)
        var clear = (top2[.., 0] - top2[.., 1]).gt(1e-3);
        long wrong = expected.ne(logits.argmax(-1)).logical_and(clear).sum().item<long>();
        Assert.True(wrong == 0, $"{wrong} clear argmax positions differ");
        Assert.True(clear.sum().item<long>() > ids.Length / 2, "most positions must be clear choices");
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void GreedyIdsWithTheCacheMatchGolden(string variant, string caseName)
    {
        using var scope = NewDisposeScope();
        using var model = Load(variant);
        var c = FamilyFixtures.Golden(variant).GetProperty("cases").GetProperty(caseName);
        var (expected, firm) = FamilyFixtures.GreedyIds(c);
        var result = TokenGenerator.Generate(model, PromptIds(variant, caseName).Select(x => (int)x).ToList(), Features(model, variant, caseName),
            ImageContextId(variant), new SamplingOptions { MaxNewTokens = expected.Length, Temperature = 0 }, new HashSet<int> { EosId(variant) });
        Assert.Equal(expected[..firm], result.TokenIds.Take(firm).ToArray());
    }

    [Theory]
    [InlineData("qwen2", false)]
    [InlineData("qwen3", true)]
    public void PeftAdapterLossGradientsAndMergeMatchGolden(string variant, bool checkpointing)
    {
        using var scope = NewDisposeScope();
        using var model = Load(variant);
        foreach (var p in model.parameters()) p.requires_grad_(false);
        var meta = FamilyFixtures.Golden(variant);
        var golden = FamilyFixtures.GoldenTensors(variant);
        var config = PeftAdapter.Load(model.language_model, FamilyFixtures.AdapterDir(variant));
        Assert.Equal(model.language_model.OfficialLoraTargets.Order(), config.TargetModules.Order());
        ActivationCheckpointing.Apply(model.language_model, checkpointing, new DropoutSeeds(0));

        var sample = meta.GetProperty("train_sample");
        var ids = FamilyFixtures.Longs(sample.GetProperty("input_ids"));
        var labels = FamilyFixtures.Longs(sample.GetProperty("labels"));
        var features = golden.Read("vit_features.clot");
        var embeds = model.EmbedWithImages(tensor(ids).unsqueeze(0), features, ImageContextId(variant));
        var hidden = model.language_model.Forward(embeds, new DecoderInputs());
        var (loss, _) = CausalLmLoss.Compute(hidden, tensor(labels).unsqueeze(0), model.language_model.OutputHead);
        loss.backward();
        BackwardScratch.Release();
        double expectedLoss = meta.GetProperty("lora").GetProperty("loss").GetDouble();
        Assert.True(Math.Abs(loss.item<float>() - expectedLoss) / expectedLoss <= 1e-4, $"loss {loss.item<float>()} vs golden {expectedLoss}");
        int compared = 0;
        var errors = new List<string>();
        foreach (var (name, linear) in PeftAdapter.LoraLinears(model.language_model))
            foreach (var (part, p) in new[] { ("lora_A", linear.lora_A!.weight), ("lora_B", linear.lora_B!.weight) })
            {
                var expected = golden.Read($"lora_grad.base_model.model.{name}.{part}.default.weight");
                double rel = (p.grad! - expected).norm().item<float>() / expected.norm().item<float>();
                if (rel > 1e-3) errors.Add($"{name}.{part}: relative gradient error {rel:g3}");
                compared++;
            }
        Assert.True(errors.Count == 0, string.Join("; ", errors));
        Assert.Equal(2 * 7 * model.Config.Llm.NumHiddenLayers, compared);

        ActivationCheckpointing.Apply(model.language_model, false, new DropoutSeeds(0));
        using var noGrad = no_grad();
        LoraMerge.MergeInto(model.language_model);
        var merged = model.language_model.Logits(model.language_model.Forward(embeds.detach(), new DecoderInputs()))[0];
        ModelParityTests.AssertClose(golden.Read("merged_logits_last"), merged[^1..], Tol);
        ModelParityTests.AssertClose(golden.Read("merged_lse"), merged.logsumexp(-1), Tol);
    }

    [Fact]
    public void TiedQwen3HeadReadsTheEmbeddingAndTheFileHasNoHead()
    {
        using var model = Load("qwen3");
        var lm = Assert.IsType<LlamaForCausalLM>(model.language_model);
        Assert.Null(lm.lm_head);
        Assert.Null(lm.OutputHeadName);
        Assert.DoesNotContain(model.named_parameters(), p => p.name.Contains("lm_head"));
        using var file = SafetensorsFile.Open(Path.Combine(FamilyFixtures.ModelDir("qwen3"), "model.safetensors"));
        Assert.DoesNotContain(file.Entries.Keys, k => k.Contains("lm_head"));
        using var noGrad = no_grad();
        var x = randn(2, model.Config.Llm.HiddenSize);
        var expected = x.matmul(lm.model.embed_tokens.weight.t());
        Assert.True((lm.Logits(x) - expected).abs().max().item<float>() < 1e-6);
        Assert.Equal(8, lm.model.layers[0].self_attn.q_proj.OutFeatures / model.Config.Llm.HeadDim);
    }

    private static InternVLChatModel Load(string variant) =>
        InternVLModelLoader.Load(FamilyFixtures.ModelDir(variant), new ModelOptions { Attention = AttentionKind.Exact });

    private static long[] PromptIds(string variant, string caseName) =>
        FamilyFixtures.Longs(FamilyFixtures.Golden(variant).GetProperty("cases").GetProperty(caseName).GetProperty("prompt_ids"));

    private static int ImageContextId(string variant) => FamilyFixtures.Golden(variant).GetProperty("img_context_id").GetInt32();

    private static int EosId(string variant) => FamilyFixtures.Golden(variant).GetProperty("eos_id").GetInt32();

    private static Tensor Pixels(string variant, IEnumerable<string> names)
    {
        var processor = new VlmTune.Vision.ImageProcessor();
        return cat(names.Select(n => processor.Process(FamilyFixtures.ImagePath(variant, n)).PixelValues).ToList(), 0);
    }

    /// <summary>The official projector output of a case's images, so the LLM is compared on the very same inputs.</summary>
    private static Tensor? Features(InternVLChatModel model, string variant, string caseName)
    {
        var names = FamilyFixtures.Golden(variant).GetProperty("cases").GetProperty(caseName).GetProperty("images")
            .EnumerateArray().Select(e => e.GetString()!).ToList();
        if (names.Count == 0) return null;
        var golden = FamilyFixtures.GoldenTensors(variant);
        return cat(names.Select(n => golden.Read($"vit_features.{n}")).ToList(), 0);
    }
}
