using VlmTune.Inference;
using static TorchSharp.torch;

namespace VlmTune.Tests.Inference;

public sealed class SamplerTests
{
    private static Tensor Logits() => tensor(new float[] { 1f, 3f, 2.5f, -1f, 0.5f }).unsqueeze(0);

    private static long Draw(SamplingOptions o, Tensor? seen = null)
    {
        using var s = new Sampler(o);
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
        using var a = new Sampler(o);
        using var b = new Sampler(o);
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
                using var s = new Sampler(o);
                Assert.Throws<NonFiniteScoresException>(() => s.Next(logits, seen));
            }
        }
        // Every score -inf: nothing to sample from.
        using var sampler = new Sampler(new SamplingOptions { Temperature = 1, Seed = 1 });
        Assert.Throws<NonFiniteScoresException>(() => sampler.Next(full(1, 4, float.NegativeInfinity), null));
    }

    /// <summary>
    /// The engine samples a decode step's rows together (Sampler.Sample): each row's id is the one it draws alone with
    /// the same options and seed, whatever the other rows ask for, and a row without a finite score fails alone.
    /// </summary>
    [Fact]
    public void ABatchSamplesEachRowAsItWouldAlone()
    {
        var options = new[]
        {
            new SamplingOptions(),
            new SamplingOptions { Temperature = 1.5, TopK = 3, Seed = 11 },
            new SamplingOptions { Temperature = 0.7, TopP = 0.8, Seed = 12 },
            new SamplingOptions { RepetitionPenalty = 1.5 },                              // greedy after the penalty
            new SamplingOptions { Temperature = 2, TopK = 4, TopP = 0.9, RepetitionPenalty = 1.3, Seed = 13 },
            new SamplingOptions { Temperature = 1, Seed = 14 },                            // NaN scores
        };
        var generator = new Generator(5);
        var logits = randn(options.Length, 50, generator: generator) * 3;
        logits[5, 7] = float.NaN;
        var seen = tensor(new long[] { 2, 9, 2, 30, 41, 2 }).unsqueeze(0).expand(options.Length, 6).contiguous();   // a repeat pads
        var batch = options.Select(o => new Sampler(o)).ToList();
        for (int step = 0; step < 20; step++)
        {
            var together = Sampler.Sample(batch, logits, seen);
            Assert.Equal([true, true, true, true, true, false], together.Finite);
            for (int i = 0; i < 5; i++)
            {
                // A sampler of its own with the same seed has drawn as many uniforms: the same stream.
                using var alone = new Sampler(options[i]);
                for (int k = 0; k < step; k++) alone.Next(logits[i..(i + 1)], seen[i..(i + 1)]);
                Assert.Equal(alone.Next(logits[i..(i + 1)], seen[i..(i + 1)]).item<long>(), together.Ids[i]);
            }
        }
    }

    /// <summary>The inverse-CDF draw follows softmax(logits / T): 4,000 seeds against the five probabilities.</summary>
    [Fact]
    public void DrawsFollowTheDistribution()
    {
        var probabilities = Logits().softmax(-1)[0].data<float>().ToArray();
        var counts = new int[probabilities.Length];
        const int draws = 4000;
        for (int seed = 0; seed < draws; seed++) counts[Draw(new SamplingOptions { Temperature = 1, Seed = seed })]++;
        for (int v = 0; v < counts.Length; v++)
            Assert.True(Math.Abs(counts[v] / (double)draws - probabilities[v]) < 0.025, $"id {v}: drawn {counts[v] / (double)draws:0.###}, probability {probabilities[v]:0.###}");
    }

    /// <summary>
    /// Requests seeded 1, 2, 3… draw independently: over 8 equally likely ids, seeds s and s + 2 pick the same first id
    /// about 1 time in 8 (seeded System.Random's first draws step by ~0.045 every two seeds: 2 times in 3).
    /// </summary>
    [Fact]
    public void ConsecutiveSeedsDrawIndependently()
    {
        var flat = zeros(1, 8);
        long First(int seed)
        {
            using var s = new Sampler(new SamplingOptions { Temperature = 1, Seed = seed });
            return s.Next(flat, null).item<long>();
        }
        var firsts = Enumerable.Range(0, 402).Select(First).ToArray();
        foreach (int gap in new[] { 1, 2 })
        {
            double same = Enumerable.Range(0, 400).Count(i => firsts[i] == firsts[i + gap]) / 400.0;
            Assert.True(same < 0.25, $"seeds {gap} apart drew the same id {same:P0} of the time");
        }
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
