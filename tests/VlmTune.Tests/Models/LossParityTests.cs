using VlmTune.Models;
using VlmTune.Tests.Support;
using static TorchSharp.torch;

namespace VlmTune.Tests.Models;

public sealed class LossParityTests(TinyModelFixture tiny) : IClassFixture<TinyModelFixture>
{
    [FixtureTheory]
    [InlineData(0L)]
    [InlineData(6731L)]
    public void Probe(long minLen)
    {
        using var scope = NewDisposeScope();
        var ts = Fixtures.Golden.GetProperty("train_sample");
        var ids = ts.GetProperty("input_ids").EnumerateArray().Select(e => e.GetInt64()).ToArray();
        var labels = ts.GetProperty("labels").EnumerateArray().Select(e => e.GetInt64()).ToArray();
        double golden = ts.GetProperty("loss").GetDouble();
        tiny.Model.language_model.model.Rotary.MinDynamicLength = minLen;
        try
        {
            using var _ = no_grad();
            var feats = tiny.Model.ExtractFeatures(Fixtures.GoldenTensors.Read("pixel_values.clot"));
            var emb = tiny.Model.EmbedWithImages(tensor(ids).unsqueeze(0), feats, 92546);
            var logits = tiny.Model.language_model.Logits(tiny.Model.language_model.Forward(emb, new DecoderInputs()))[0];
            var loss = nn.functional.cross_entropy(logits[..^1], tensor(labels)[1..], ignore_index: -100).item<float>();
            Console.WriteLine($"minLen={minLen} loss={loss} golden={golden} rel={Math.Abs(loss - golden) / golden}");
        }
        finally { tiny.Model.language_model.model.Rotary.MinDynamicLength = 0; }
    }
}
