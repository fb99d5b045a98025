using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Tests.Models;

public sealed class RotaryAndEmbeddingTests
{
    private static LlmConfig Llm(RopeScaling? scaling) => new()
    {
        Architecture = "InternLM2ForCausalLM", HiddenSize = 64, NumHiddenLayers = 1, NumAttentionHeads = 4, NumKeyValueHeads = 2,
        IntermediateSize = 96, VocabSize = 32, MaxPositionEmbeddings = 16, RopeTheta = 10000, RopeScaling = scaling,
    };

    [Fact]
    public void LinearScalingDividesPositionsByTheFactor()
    {
        using var scope = NewDisposeScope();
        var plain = new RotaryEmbedding(Llm(null)).Tables(tensor(new long[] { 0, 1, 2, 3 }).unsqueeze(0), 4, ScalarType.Float32);
        var scaled = new RotaryEmbedding(Llm(new RopeScaling("linear", 2))).Tables(tensor(new long[] { 0, 2, 4, 6 }).unsqueeze(0), 7, ScalarType.Float32);
        Assert.True(allclose(plain.Cos, scaled.Cos, 1e-6, 1e-6));
        Assert.True(allclose(plain.Sin, scaled.Sin, 1e-6, 1e-6));
    }

    [Fact]
    public void DynamicNtkScalesTheBaseOnlyBeyondTheTrainedLength()
    {
        var rope = new RotaryEmbedding(Llm(new RopeScaling("dynamic", 2)));
        Assert.Equal(10000, rope.Theta(16));
        // HF: base · (factor·L/max − (factor − 1))^(d/(d−2)), d = head_dim = 16
        Assert.Equal(10000 * Math.Pow(2.0 * 32 / 16 - 1, 16 / 14.0), rope.Theta(32), 6);
        rope.MinDynamicLength = 32;
        Assert.Equal(rope.Theta(32), rope.Theta(5));
    }

    [Fact]
    public void CachedKeysAreRerotatedWhenTheBaseGrows()
    {
        // Rotating at base a, then re-rotating a→b, equals rotating at base b directly.
        using var scope = NewDisposeScope();
        var rope = new RotaryEmbedding(Llm(new RopeScaling("dynamic", 2)));
        var positions = arange(20L).unsqueeze(0);
        var x = randn(1, 2, 20, 16);
        var atA = rope.Tables(positions, 20, ScalarType.Float32);
        var atB = rope.Tables(positions, 21, ScalarType.Float32);
        var rerotated = RotaryTables.Rerotate(rope, atA.Apply(x), positions, atA.Theta, atB.Theta);
        Assert.True(allclose(atB.Apply(x), rerotated, 1e-5, 1e-5));
    }

    [Fact]
    public void VisionPositionEmbeddingsAreInterpolatedForOtherGrids()
    {
        using var scope = NewDisposeScope();
        var vision = new VisionConfig { HiddenSize = 8, NumHiddenLayers = 1, NumAttentionHeads = 2, IntermediateSize = 16, ImageSize = 56, PatchSize = 14, NormType = "layer_norm" };
        using var model = new InternVisionModel(vision, new ModelOptions());
        RandomInit.Apply(model, 1);
        using var _ = no_grad();
        Assert.Equal(new long[] { 1, 17, 8 }, model.Forward(randn(1, 3, 56, 56)).shape);   // trained 4×4 grid
        Assert.Equal(new long[] { 1, 37, 8 }, model.Forward(randn(1, 3, 84, 84)).shape);   // 6×6 grid, bicubic-resized table
    }

    [Fact]
    public void QkNormalisationAddsNormsThatChangeTheOutput()
    {
        using var scope = NewDisposeScope();
        var vision = new VisionConfig { HiddenSize = 8, NumHiddenLayers = 1, NumAttentionHeads = 2, IntermediateSize = 16, ImageSize = 28, PatchSize = 14, QkNormalization = true };
        using var model = new InternVisionModel(vision, new ModelOptions());
        var names = model.named_parameters().Select(p => p.name).ToList();
        Assert.Contains("encoder.layers.0.attn.q_norm.weight", names);
        Assert.Contains("encoder.layers.0.attn.k_norm.weight", names);
        RandomInit.Apply(model, 1);
        using var _ = no_grad();
        var x = randn(1, 3, 28, 28);
        var before = model.Forward(x);
        model.encoder.layers[0].attn.q_norm!.weight.fill_(3.0);
        Assert.False(allclose(before, model.Forward(x)));
    }
}
