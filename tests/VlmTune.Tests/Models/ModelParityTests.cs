using System.Text.Json;
using TorchSharp;
using VlmTune.Checkpoints;
using VlmTune.Models;
using VlmTune.Tests.Support;
using static TorchSharp.torch;

namespace VlmTune.Tests.Models;

/// <summary>Parity of the C# model with golden outputs of the official InternVL Python code (fp32 on CPU).</summary>
public sealed class ModelParityTests(TinyModelFixture tiny) : IClassFixture<TinyModelFixture>
{
    private const double Tol = 2e-3;   // GOLDEN.md: ViT hidden/features, logits, lse max abs diff

    [FixtureFact]
    public void VisionHiddenStateAndFeaturesMatchGolden()
    {
        using var scope = NewDisposeScope();
        var pixels = Fixtures.GoldenTensors.Read("pixel_values.clot");
        using (no_grad())
        {
            var hidden = tiny.Model.vision_model.Forward(pixels);
            AssertClose(Fixtures.GoldenTensors.Read("vit_last_hidden.clot"), hidden, Tol);
            var features = tiny.Model.ExtractFeatures(pixels);
            AssertClose(Fixtures.GoldenTensors.Read("vit_features.clot"), features, Tol);
        }
    }

    [FixtureTheory]
    [InlineData("text_only")]
    [InlineData("one_image")]
    public void LogitsMatchGolden(string caseName)
    {
        using var scope = NewDisposeScope();
        var c = Fixtures.Golden.GetProperty("cases").GetProperty(caseName);
        var ids = c.GetProperty("prompt_ids").EnumerateArray().Select(e => e.GetInt64()).ToArray();
        Tensor? features = null;
        if (caseName == "one_image")
            using (no_grad()) features = tiny.Model.ExtractFeatures(Fixtures.GoldenTensors.Read("pixel_values.clot"));
        var (logits, lse, argmax) = tiny.FullLogits(ids, features);
        AssertClose(Fixtures.GoldenTensors.Read($"logits_last.{caseName}"), logits[^4..], Tol);
        AssertClose(Fixtures.GoldenTensors.Read($"lse.{caseName}"), lse, Tol);
        Assert.Equal(Fixtures.GoldenTensors.Read($"argmax.{caseName}").data<long>().ToArray(), argmax.data<long>().ToArray());
    }

    internal static void AssertClose(Tensor expected, Tensor actual, double atol)
    {
        Assert.Equal(expected.shape, actual.shape);
        double diff = (expected.to_type(ScalarType.Float32) - actual.to_type(ScalarType.Float32)).abs().max().item<float>();
        Assert.True(diff <= atol, $"max abs diff {diff:g4} > {atol:g4}");
    }
}

/// <summary>The tiny fixture model, loaded once per test class (fp32, exact attention).</summary>
public sealed class TinyModelFixture : IDisposable
{
    private readonly Lazy<InternVLChatModel> _model = new(() =>
        InternVLModelLoader.Load(Fixtures.TinyModel, new ModelOptions { Attention = AttentionKind.Exact }));

    public InternVLChatModel Model => _model.Value;

    public const int ImageContextId = 92546;

    /// <summary>Logits (T, V), per-position logsumexp (T) and argmax (T) of a full pass over the prompt.</summary>
    public (Tensor Logits, Tensor Lse, Tensor Argmax) FullLogits(long[] ids, Tensor? imageFeatures)
    {
        using var noGrad = no_grad();
        var input = tensor(ids).unsqueeze(0);
        var embeds = Model.EmbedWithImages(input, imageFeatures, ImageContextId);
        var hidden = Model.language_model.Forward(embeds, new DecoderInputs());
        var logits = Model.language_model.Logits(hidden)[0];
        return (logits, logits.logsumexp(-1), logits.argmax(-1));
    }

    public void Dispose()
    {
        if (_model.IsValueCreated) _model.Value.Dispose();
    }
}

/// <summary>The long two-image case: 6,720 tokens (dynamic-NTK RoPE), pixels from the real image pipeline.</summary>
public sealed class LongPromptParityTests(TinyModelFixture tiny) : IClassFixture<TinyModelFixture>
{
    [FixtureFact]
    public void TwoImageLogitsMatchGolden()
    {
        using var scope = NewDisposeScope();
        var c = Fixtures.Golden.GetProperty("cases").GetProperty("two_images");
        var ids = c.GetProperty("prompt_ids").EnumerateArray().Select(e => e.GetInt64()).ToArray();
        var processor = new VlmTune.Vision.ImageProcessor();
        var pixels = cat(c.GetProperty("images").EnumerateArray()
            .Select(n => processor.Process(Path.Combine(Fixtures.TinyDir, "images", n.GetString() + ".png")).PixelValues).ToList(), 0);
        Tensor features;
        using (no_grad()) features = tiny.Model.ExtractFeatures(pixels);
        var (logits, lse, argmax) = tiny.FullLogits(ids, features);
        ModelParityTests.AssertClose(Fixtures.GoldenTensors.Read("logits_last.two_images"), logits[^4..], 2e-3);
        ModelParityTests.AssertClose(Fixtures.GoldenTensors.Read("lse.two_images"), lse, 2e-3);
        Assert.Equal(Fixtures.GoldenTensors.Read("argmax.two_images").data<long>().ToArray(), argmax.data<long>().ToArray());
    }
}
