using System.Collections.Concurrent;
using VlmTune.Inference;
using VlmTune.Tests.Models;
using VlmTune.Tests.Support;
using static TorchSharp.torch;

namespace VlmTune.Tests.Inference;

/// <summary>What the engine reports of a request (the server's /metrics is built on it), and its own step and cache figures.</summary>
public sealed class GenerationObserverTests(TinyModelFixture tiny) : IClassFixture<TinyModelFixture>
{
    private static readonly HashSet<int> Stop = [92542];

    private static int[] Ids(string caseName, string field) =>
        Fixtures.Golden.GetProperty("cases").GetProperty(caseName).GetProperty(field).EnumerateArray().Select(e => e.GetInt32()).ToArray();

    /// <summary>Writes down every event in order; throws on the one named, if any.</summary>
    private sealed class Recorder(string? throwOn = null) : IGenerationObserver
    {
        public ConcurrentQueue<string> Events { get; } = new();

        private void Record(string e)
        {
            Events.Enqueue(e);
            if (e.StartsWith(throwOn ?? "\0", StringComparison.Ordinal)) throw new InvalidOperationException("observer failed");
        }

        public void Admitted() => Record("admitted");
        public void TilesEncoded(int tiles) => Record($"tiles {tiles}");
        public void Prefilled(int tokens) => Record($"prefilled {tokens}");
        public void Token() => Record("token");
    }

    private static async Task WaitIdleAsync(InferenceEngine engine)
    {
        for (int i = 0; i < 400 && (engine.Stats.Running > 0 || engine.Stats.Decoding > 0); i++) await Task.Delay(25);
    }

    [FixtureFact]
    public async Task TheObserverSeesAdmissionTilesPrefillAndEveryToken()
    {
        using var engine = new InferenceEngine(tiny.Model, TinyModelFixture.ImageContextId);
        var prompt = Ids("one_image", "prompt_ids");
        var expected = Ids("one_image", "greedy_ids");
        var pixels = Fixtures.GoldenTensors.Read("pixel_values.clot");
        long tiles = pixels.shape[0];
        var recorder = new Recorder();
        var result = await engine.GenerateAsync(new GenerationRequest
        {
            PromptIds = prompt, Pixels = pixels, Sampling = new SamplingOptions { MaxNewTokens = expected.Length }, StopIds = Stop, Observer = recorder,
        });
        Assert.Equal(expected, result.TokenIds);
        string[] want = ["admitted", $"tiles {tiles}", $"prefilled {prompt.Length}", .. Enumerable.Repeat("token", expected.Length)];
        Assert.Equal(want, recorder.Events.ToArray());

        // One token came from the prefill, each of the others from a decode step of this sequence alone.
        var steps = engine.DecodeStepsByBatchSize();
        Assert.Equal(engine.Options.MaxBatch + 1, steps.Length);
        Assert.Equal(expected.Length - 1, steps[1]);
        Assert.Equal(expected.Length - 1, steps.Sum());
        await WaitIdleAsync(engine);
        Assert.Equal(0, engine.Stats.Decoding);
        Assert.Equal(0, engine.Stats.CacheSlots);
    }

    /// <summary>An observer that throws (at admission, at a token) fails its own request; the one beside it is untouched.</summary>
    [FixtureTheory]
    [InlineData("admitted")]
    [InlineData("token")]
    public async Task AThrowingObserverFailsOnlyItsRequest(string throwOn)
    {
        using var engine = new InferenceEngine(tiny.Model, TinyModelFixture.ImageContextId);
        var prompt = Ids("text_only", "prompt_ids");
        var expected = Ids("text_only", "greedy_ids");
        var good = engine.Submit(new GenerationRequest { PromptIds = prompt, Sampling = new SamplingOptions { MaxNewTokens = expected.Length }, StopIds = Stop, Observer = new Recorder() });
        var bad = engine.Submit(new GenerationRequest { PromptIds = prompt, Sampling = new SamplingOptions { MaxNewTokens = expected.Length }, StopIds = Stop, Observer = new Recorder(throwOn) });
        var error = await Assert.ThrowsAsync<InvalidOperationException>(() => bad.Completion);
        Assert.Equal("observer failed", error.Message);
        Assert.Equal(expected, (await good.Completion).TokenIds);
        await WaitIdleAsync(engine);
        Assert.Equal(0, engine.Stats.Running);
        Assert.Equal(0, engine.Stats.CacheSlots);
    }
}
