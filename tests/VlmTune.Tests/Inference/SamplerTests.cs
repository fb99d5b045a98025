using VlmTune.Inference;
using static TorchSharp.torch;

namespace VlmTune.Tests.Inference;

public sealed class SamplerTests
{
    private static Tensor Logits() => tensor(new float[] { 1f, 3f, 2.5f, -1f, 0.5f }).unsqueeze(0);

    private static long Draw(SamplingOptions o, Tensor? seen = null)
    {
        using var s = new Sampler(o, CPU);
        return s.Next(Logits(), seen).item<long>();
    }

    [Fact]
    public void GreedyPicksTheArgmax() => Assert.Equal(1, Draw(new SamplingOptions()));

    [Fact]
    public void TopKOfOneAndTinyTopPAreGreedy()
    {
        for (int seed = 0; seed < 20; seed++)
        {
            Assert.Equal(1, Draw(new SamplingOptions { Temperature = 1, TopK = 1, Seed = seed }));
            Assert.Equal(1, Draw(new SamplingOptions { Temperature = 1, TopP = 0.01, Seed = seed }));
        }
    }

    [Fact]
    public void TopKKeepsOnlyTheKBest()
    {
        var drawn = Enumerable.Range(0, 200).Select(seed => Draw(new SamplingOptions { Temperature = 5, TopK = 2, Seed = seed })).ToHashSet();
        Assert.Equal(new HashSet<long> { 1, 2 }, drawn);
    }

    [Fact]
    public void ASeedReproducesItsTokens()
    {
        var o = new SamplingOptions { Temperature = 2, Seed = 7 };
        using var a = new Sampler(o, CPU);
        using var b = new Sampler(o, CPU);
        for (int i = 0; i < 10; i++) Assert.Equal(a.Next(Logits(), null).item<long>(), b.Next(Logits(), null).item<long>());
    }

    [Fact]
    public void RepetitionPenaltyDemotesSeenTokens()
    {
        // 3 / 1.5 = 2 < 2.5: the seen best token loses to the unseen second.
        Assert.Equal(2, Draw(new SamplingOptions { RepetitionPenalty = 1.5 }, tensor(new long[] { 1 }).unsqueeze(0)));
    }

    [Fact]
    public void InvalidSettingsAreAllReported()
    {
        var problems = new SamplingOptions { Temperature = -1, TopP = 0, TopK = -2, MaxNewTokens = 0 }.Validate().ToList();
        Assert.Equal(4, problems.Count);
    }
}
