using VlmTune.Checkpoints;
using VlmTune.Models;
using VlmTune.Tests.Support;
using static TorchSharp.torch;

namespace VlmTune.Tests.Training;

/// <summary>The golden training sample (official preprocess_internlm output) and a fresh tiny model set up as the golden run was.</summary>
internal static class GoldenSample
{
    public const int ImageContextId = 92546;
    /// <summary>The official dynamic-NTK rotary had seen a 6,731-token prompt before the training goldens were computed.</summary>
    public const long SeenLength = 6731;

    public static long[] InputIds => Ints("input_ids");
    public static long[] Labels => Ints("labels");

    private static long[] Ints(string key) =>
        Fixtures.Golden.GetProperty("train_sample").GetProperty(key).EnumerateArray().Select(e => e.GetInt64()).ToArray();

    public static InternVLChatModel FreshModel()
    {
        var model = InternVLModelLoader.Load(Fixtures.TinyModel, new ModelOptions { Attention = AttentionKind.Exact });
        model.language_model.Rotary.MinDynamicLength = SeenLength;
        foreach (var p in model.parameters()) p.requires_grad_(false);
        return model;
    }

    /// <summary>Final hidden states (1, T, D) of the golden sample.</summary>
    public static Tensor Hidden(InternVLChatModel model)
    {
        Tensor features;
        using (no_grad()) features = model.ExtractFeatures(Fixtures.GoldenTensors.Read("pixel_values.clot"));
        var embeds = model.EmbedWithImages(tensor(InputIds).unsqueeze(0), features, ImageContextId);
        return model.language_model.Forward(embeds, new DecoderInputs());
    }
}
