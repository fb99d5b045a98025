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
    public void TemperaturesTooSmallForFp32AreGreedy()
    {
        // 5e-39 is a subnormal float: logits / it overflow to inf, and softmax of inf is NaN.
        foreach (var t in new[] { 5e-39, 1e-300, double.Epsilon, SamplingOptions.MinSamplingTemperature / 2 })
        {
            var o = new SamplingOptions { Temperature = t, TopP = 0.9, TopK = 3, Seed = 1 };
            Assert.True(o.Greedy, $"temperature {t}");
            Assert.Empty(o.Validate());
            Assert.Equal(1, Draw(o));
        }
        Assert.False(new SamplingOptions { Temperature = SamplingOptions.MinSamplingTemperature }.Greedy);
        Assert.Equal(1, Draw(new SamplingOptions { Temperature = SamplingOptions.MinSamplingTemperature, Seed = 3 }));
    }

    [Fact]
    public void RepetitionPenaltiesBeyondFp32AreRefused()
    {
        // 1e-300 is 0 in fp32: seen scores divided by it are inf (or NaN for a zero score).
        foreach (var p in new[] { 1e-300, 0.001, 1000, 1e300, double.PositiveInfinity, double.NaN })
        {
            var problems = new SamplingOptions { RepetitionPenalty = p }.Problems().ToList();
            Assert.Equal("repetition_penalty", Assert.Single(problems).Param);
        }
        foreach (var p in new[] { SamplingOptions.MinRepetitionPenalty, 1.3, SamplingOptions.MaxRepetitionPenalty })
            Assert.Empty(new SamplingOptions { RepetitionPenalty = p }.Validate());
        Assert.Single(new SamplingOptions { Temperature = double.PositiveInfinity }.Validate());
    }

    [Fact]
    public void NonFiniteScoresAreAClearError()
    {
        var seen = tensor(new long[] { 1 }).unsqueeze(0);
        foreach (var bad in new[] { float.NaN, float.PositiveInfinity })
        {
            var logits = tensor(new float[] { 1f, bad, 2.5f }).unsqueeze(0);
            foreach (var o in new[] { new SamplingOptions(), new SamplingOptions { Temperature = 0.7, Seed = 1 }, new SamplingOptions { RepetitionPenalty = 1.2 } })
            {
                using var s = new Sampler(o, CPU);
                Assert.Throws<NonFiniteScoresException>(() => s.Next(logits, seen));
            }
        }
        // Every score -inf: nothing to sample from.
        using var sampler = new Sampler(new SamplingOptions { Temperature = 1, Seed = 1 }, CPU);
        Assert.Throws<NonFiniteScoresException>(() => sampler.Next(full(1, 4, float.NegativeInfinity), null));
    }

    [Fact]
    public void InvalidSettingsAreAllReported()
    {
        var problems = new SamplingOptions { Temperature = -1, TopP = 0, TopK = -2, RepetitionPenalty = 0, MaxNewTokens = 0 }.Problems().ToList();
        Assert.Equal(["temperature", "top_p", "top_k", "repetition_penalty", "max_tokens"], problems.Select(p => p.Param));
    }

    /// <summary>The one max-tokens check: ≥ 1 always, at most the caller's limit when it has one.</summary>
    [Fact]
    public void MaxNewTokensIsCheckedAgainstTheCallersLimit()
    {
        Assert.Empty(new SamplingOptions { MaxNewTokens = 6 }.Problems());
        Assert.Equal(("max_tokens", "max_tokens must be between 1 and 5 (got 6)."), Assert.Single(new SamplingOptions { MaxNewTokens = 6 }.Problems(5)));
        Assert.Empty(new SamplingOptions { MaxNewTokens = 5 }.Problems(5));
        Assert.Equal(("max_tokens", "max_tokens must be ≥ 1 (got 0)."), Assert.Single(new SamplingOptions { MaxNewTokens = 0 }.Problems()));
    }
}
