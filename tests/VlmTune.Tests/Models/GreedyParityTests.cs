using VlmTune.Inference;
using VlmTune.Tests.Support;
using static TorchSharp.torch;

namespace VlmTune.Tests.Models;

public sealed class GreedyParityTests(TinyModelFixture tiny) : IClassFixture<TinyModelFixture>
{
    [FixtureTheory]
    [InlineData("text_only")]
    [InlineData("one_image")]
    public void CachedGreedyDecodingGivesGoldenIds(string caseName)
    {
        var c = Fixtures.Golden.GetProperty("cases").GetProperty(caseName);
        var ids = c.GetProperty("prompt_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        var expected = c.GetProperty("greedy_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        using var scope = NewDisposeScope();
        Tensor? features = null;
        if (caseName == "one_image")
            using (no_grad()) features = tiny.Model.ExtractFeatures(Fixtures.GoldenTensors.Read("pixel_values.clot"));
        var result = TokenGenerator.Generate(tiny.Model, ids, features, TinyModelFixture.ImageContextId,
            new SamplingOptions { MaxNewTokens = expected.Length }, new HashSet<int> { 92542 });
        Assert.Equal(expected, result.TokenIds);
    }
}
