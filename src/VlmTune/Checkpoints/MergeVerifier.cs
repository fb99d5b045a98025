using TorchSharp;
using VlmTune.Models;
using VlmTune.Text;
using static TorchSharp.torch;

namespace VlmTune.Checkpoints;

/// <summary>Where and how the merged model is checked against base + adapter.</summary>
public sealed record MergeVerifyOptions
{
    /// <summary>"cpu" or "cuda[:N]".</summary>
    public string Device { get; init; } = "cpu";
    /// <summary>Compute dtype; null picks float32 on CPU and bfloat16 on CUDA.</summary>
    public ScalarType? DType { get; init; }
    /// <summary>
    /// Largest accepted logit difference, relative to the largest |logit| (at least 1). Null picks 1e-3 when the merged
    /// weights and the computation are float32 (only summation order differs) and 5e-2 otherwise (16-bit rounding).
    /// </summary>
    public double? RelativeTolerance { get; init; }
}

/// <summary>Outcome of the merge check: logits of a short image + text prompt, merged model vs base + adapter.</summary>
public sealed record MergeVerifyResult(double MaxAbsDiff, double MaxAbsLogit, int Positions, int ArgmaxAgree, double Tolerance)
{
    public bool Passed => double.IsFinite(MaxAbsDiff) && double.IsFinite(MaxAbsLogit) && MaxAbsDiff <= Tolerance;

    public override string ToString() =>
        $"max |logit difference| {MaxAbsDiff:g3} over {Positions} prompt positions (tolerance {Tolerance:g3}; largest |logit| {MaxAbsLogit:g3}); " +
        $"argmax agrees at {ArgmaxAgree}/{Positions}";
}

/// <summary>
/// Reloads a merged model folder and compares its logits with the base model running the adapter unmerged, on a
/// fixed prompt with one seeded random image tile (so vision LoRA and a trained projector count too). The two models
/// are loaded one after the other, never together.
/// </summary>
public static class MergeVerifier
{
    public const string Question = "Describe this image in one sentence.";
    private const ulong ImageSeed = 20240607;

    public static MergeVerifyResult Verify(string baseDir, string adapterDir, string mergedDir, AdapterApplyOptions apply, MergeVerifyOptions options,
        CancellationToken cancel = default)
    {
        var device = TensorPlacement.ParseDevice(options.Device);
        var dtype = options.DType ?? ModelOptions.DefaultDType(device);
        var modelOptions = new ModelOptions { Device = device, DType = dtype };

        using var scope = NewDisposeScope();
        var config = InternVLConfig.Load(mergedDir);
        var tokenizer = TextTokenizer.Load(mergedDir);
        var prompt = ChatPrompt.Build(tokenizer, ConversationTemplate.Get(config.Template), Question, [1], config.NumImageToken);
        var pixels = randn([1, 3, config.ForceImageSize, config.ForceImageSize], generator: new Generator(ImageSeed));

        Tensor expected;
        using (var reference = InternVLModelLoader.Load(baseDir, modelOptions))
        {
            AdapterLoader.Apply(reference, adapterDir, apply);
            expected = Logits(reference, prompt.InputIds, pixels, tokenizer.ImgContextId);
        }
        cancel.ThrowIfCancellationRequested();   // between the two loads: a stop request need not wait for the second
        Tensor actual;
        using (var merged = InternVLModelLoader.Load(mergedDir, modelOptions))
            actual = Logits(merged, prompt.InputIds, pixels, tokenizer.ImgContextId);

        double diff = (actual - expected).abs().max().item<float>();
        double largest = expected.abs().max().item<float>();
        int agree = (int)actual.argmax(-1).eq(expected.argmax(-1)).sum().item<long>();
        bool allFloat32 = dtype == ScalarType.Float32 && !WeightDTypes(mergedDir).Any(d => d is "F16" or "BF16");
        double relative = options.RelativeTolerance ?? (allFloat32 ? 1e-3 : 5e-2);
        return new MergeVerifyResult(diff, largest, (int)expected.shape[0], agree, relative * Math.Max(1.0, largest));
    }

    /// <summary>Logits (T, V) in fp32 on the CPU for every prompt position.</summary>
    private static Tensor Logits(InternVLChatModel model, int[] ids, Tensor pixels, int imageContextId)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var features = model.ExtractFeatures(pixels.to(model.Options.DType, model.Options.Device));
        var embeds = model.EmbedWithImages(tensor(ids.Select(i => (long)i).ToArray()).unsqueeze(0), features, imageContextId);
        var hidden = model.language_model.Forward(embeds, new DecoderInputs());
        return model.language_model.Logits(hidden)[0].to(ScalarType.Float32, CPU).MoveToOuterDisposeScope();
    }

    private static IEnumerable<string> WeightDTypes(string dir)
    {
        using var checkpoint = CheckpointFolder.Open(dir);
        return checkpoint.Names.Select(n => checkpoint.Entry(n).DType).Distinct().ToList();
    }
}
