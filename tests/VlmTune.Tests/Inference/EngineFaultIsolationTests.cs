using VlmTune.Checkpoints;
using VlmTune.Inference;
using VlmTune.Models;
using VlmTune.Tests.Support;
using static TorchSharp.torch;

namespace VlmTune.Tests.Inference;

/// <summary>One sequence's failure ends that sequence only: the others in its batch go on to their solo answers.</summary>
public sealed class EngineFaultIsolationTests
{
    private static readonly HashSet<int> Stop = [92542];

    private static int[] Ids(string caseName) => Fixtures.PromptIds(caseName);

    private static InternVLChatModel LoadTiny() => InternVLModelLoader.Load(Fixtures.TinyModel, new ModelOptions { Attention = AttentionKind.Exact });

    private static int[] Alone(InternVLChatModel model, IReadOnlyList<int> prompt, SamplingOptions sampling) =>
        TokenGenerator.Generate(model, prompt, null, 92546, sampling, Stop).TokenIds.ToArray();

    /// <summary>
    /// A token whose embedding is NaN poisons the rows of the requests that feed it, and only those: batch rows never
    /// attend to each other. Here two requests generate that token first, so their scores turn NaN in the batch step
    /// after their prefill; sampling from NaN used to throw inside that step, which failed every sequence in it.
    /// </summary>
    [FixtureFact]
    public async Task NonFiniteScoresEndOnlyTheirSequence()
    {
        using var model = LoadTiny();
        var text = Ids("text_only");
        var good = new SamplingOptions { MaxNewTokens = 30 };
        int[] goodPrompt = text[..40];
        var expected = Alone(model, goodPrompt, good);
        var untouched = goodPrompt.Concat(expected).Concat(text).ToHashSet();
        // A seeded sampling request and a greedy one whose first answer token the good request never sees.
        var seeded = Enumerable.Range(1, 50).Select(seed => new SamplingOptions { MaxNewTokens = 30, Temperature = 0.8, Seed = seed })
            .First(o => !untouched.Contains(Alone(model, text, o with { MaxNewTokens = 1 })[0]));
        int sampledFirst = Alone(model, text, seeded with { MaxNewTokens = 1 })[0];
        var greedyPrompt = Enumerable.Range(20, 30).Select(n => text[..n]).First(p => !untouched.Contains(Alone(model, p, good with { MaxNewTokens = 1 })[0]));
        int greedyFirst = Alone(model, greedyPrompt, good with { MaxNewTokens = 1 })[0];
        using (no_grad())
            foreach (var id in new[] { sampledFirst, greedyFirst }) model.language_model.TokenEmbedding.weight[id].fill_(float.NaN);

        using var engine = new InferenceEngine(model, 92546);
        var first = engine.Submit(new GenerationRequest { PromptIds = goodPrompt, Sampling = good, StopIds = Stop });
        // Wait until the good request decodes, so the others join its batch.
        await foreach (var _ in first.ReadTokensAsync()) break;
        var sampling = engine.Submit(new GenerationRequest { PromptIds = text, Sampling = seeded, StopIds = Stop });
        var greedy = engine.Submit(new GenerationRequest { PromptIds = greedyPrompt, Sampling = good, StopIds = Stop });

        Assert.Equal(expected, (await first.Completion).TokenIds);
        // Greedy as well: the argmax of a NaN row is no token (it used to answer one id over and over).
        foreach (var failed in new[] { sampling, greedy })
        {
            var error = await Assert.ThrowsAnyAsync<Exception>(() => failed.Completion);
            Assert.Contains("non-finite", error.Message);
        }
        // The engine drops finished sequences right after the step that finished them.
        for (int i = 0; i < 400 && engine.Stats.Running > 0; i++) await Task.Delay(25);
        Assert.Equal(0, engine.Stats.Running);
    }

    /// <summary>
    /// Sampling values inside what the API documents but beyond what fp32 can divide by (a temperature of 5e-39)
    /// decode next to a greedy request; neither fails.
    /// </summary>
    [FixtureFact]
    public async Task ATinyTemperatureIsGreedyAndHarmsNoOne()
    {
        using var model = LoadTiny();
        var text = Ids("text_only");
        var greedy = new SamplingOptions { MaxNewTokens = 20 };
        var expected = Alone(model, text, greedy);
        using var engine = new InferenceEngine(model, 92546);
        var plain = engine.Submit(new GenerationRequest { PromptIds = text, Sampling = greedy, StopIds = Stop });
        await foreach (var _ in plain.ReadTokensAsync()) break;
        var tiny = engine.Submit(new GenerationRequest { PromptIds = text, Sampling = greedy with { Temperature = 5e-39, Seed = 1 }, StopIds = Stop });
        Assert.Equal(expected, (await plain.Completion).TokenIds);
        Assert.Equal(expected, (await tiny.Completion).TokenIds);
    }
}
