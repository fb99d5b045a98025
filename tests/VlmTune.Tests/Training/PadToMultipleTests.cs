using VlmTune.Checkpoints;
using VlmTune.Data;
using VlmTune.Models;
using VlmTune.Tests.Support;
using VlmTune.Training;
using static TorchSharp.torch;

namespace VlmTune.Tests.Training;

/// <summary>
/// pad_to_multiple_of pads rows past their longest sample; the dynamic-NTK RoPE base must still come from the longest
/// sample (the official code's padded-to-the-longest batch), or rounding past max_position_embeddings would rescale
/// every position's rotation.
/// </summary>
public class PadToMultipleTests
{
    [FixtureFact]
    public void RowsRoundedPastMaxPositionsKeepTheLongestSamplesRopeBase()
    {
        using var scope = NewDisposeScope();
        using var model = InternVLModelLoader.Load(Fixtures.TinyModel, new ModelOptions());
        long maxPositions = model.Config.Llm.MaxPositionEmbeddings;   // 512, dynamic NTK above it
        var text = randint(3, 90000, [480], generator: new Generator(5)).data<long>().Select(x => (int)x).ToArray();
        using var sample = new EncodedSample("text", text, text.Select((x, i) => i < 10 ? -100 : x).ToArray(), null, 0);
        using var plain = TrainBatch.Collate(0, [sample], 0, padId: 2);
        using var rounded = TrainBatch.Collate(0, [sample], 0, padId: 2, padMultiple: 300);
        Assert.True(rounded.InputIds.shape[1] > maxPositions && plain.InputIds.shape[1] <= maxPositions);

        Tensor Hidden(TrainBatch batch, long? ropeLength)
        {
            using var noGrad = no_grad();
            var embeds = model.EmbedWithImages(batch.InputIds, null, 92546);
            return model.language_model.Forward(embeds, new DecoderInputs { RopeLength = ropeLength })[0, ..480];   // the real tokens
        }

        var expected = Hidden(plain, plain.RopeLength);
        Assert.Equal(480, rounded.RopeLength);
        double scale = expected.abs().max().item<float>();
        double kept = (Hidden(rounded, rounded.RopeLength) - expected).abs().max().item<float>();
        double rescaled = (Hidden(rounded, null) - expected).abs().max().item<float>();   // the base the row length alone gives
        Assert.True(kept <= 1e-5 * scale, $"rounded rows: hidden states differ by {kept:g3} (largest {scale:g3})");
        Assert.True(rescaled > 1e-3 * scale, $"a base from the padded length should change them: {rescaled:g3}");
    }
}
