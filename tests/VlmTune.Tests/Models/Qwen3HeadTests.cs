using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Tests.Models;

/// <summary>
/// Qwen3's output head tied or not: the released InternVL3.5-4B and -8B untie it (docs/model.md) although their
/// Qwen3 bases tie theirs, so both must build and train as their config says.
/// </summary>
public sealed class Qwen3HeadTests
{
    private static LlmConfig Qwen3(bool tied) => new()
    {
        Architecture = LlmArchitectures.Qwen3, HiddenSize = 32, NumHiddenLayers = 1, NumAttentionHeads = 4, NumKeyValueHeads = 2,
        IntermediateSize = 48, VocabSize = 64, MaxPositionEmbeddings = 128, RopeTheta = 1e6, QkNorm = true, TieWordEmbeddings = tied,
    };

    [Fact]
    public void AnUntiedQwen3HasAHeadOfItsOwnThatLoraAdaptsAndATiedOneHasNone()
    {
        using var scope = NewDisposeScope();
        using var untied = CausalLanguageModel.Create(Qwen3(tied: false), new ModelOptions());
        Assert.Equal("lm_head", untied.OutputHeadName);
        Assert.Contains("lm_head.weight", untied.named_parameters().Select(p => p.name));
        Assert.Contains("lm_head", untied.DefaultLoraTargets);
        RandomInit.Apply(untied, 3);
        using (no_grad()) untied.TokenEmbedding.weight!.zero_();
        Assert.NotEqual(0.0, untied.OutputHead.weight!.abs().sum().item<float>());   // not a view of the embedding

        using var tied = CausalLanguageModel.Create(Qwen3(tied: true), new ModelOptions());
        Assert.Null(tied.OutputHeadName);
        Assert.DoesNotContain("lm_head.weight", tied.named_parameters().Select(p => p.name));
        Assert.DoesNotContain("lm_head", tied.DefaultLoraTargets);
        RandomInit.Apply(tied, 3);
        using (no_grad()) tied.TokenEmbedding.weight!.zero_();
        Assert.Equal(0.0, tied.OutputHead.weight!.abs().sum().item<float>());         // the embedding itself
    }
}
