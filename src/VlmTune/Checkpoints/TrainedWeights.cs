using TorchSharp;
using static TorchSharp.torch;

namespace VlmTune.Checkpoints;

/// <summary>
/// The non-LoRA weights a training run changed (the projector <c>mlp1</c> by default; the ViT or the whole LLM when
/// unfrozen), stored in a checkpoint folder as <c>trainable.safetensors</c> under the model's own parameter names.
/// Inference with a checkpoint needs them besides the LoRA adapter.
/// </summary>
public static class TrainedWeights
{
    public const string FileName = "trainable.safetensors";

    public static void Save(string dir, IEnumerable<KeyValuePair<string, Tensor>> weights) =>
        SafetensorsWriter.Write(Path.Combine(dir, FileName), weights);

    /// <summary>
    /// Copies <c>trainable.safetensors</c> of <paramref name="dir"/> into <paramref name="model"/> if the folder has one;
    /// returns how many tensors were loaded. Every name must be a parameter of the model with the same shape.
    /// </summary>
    public static int LoadIfPresent(nn.Module model, string dir)
    {
        string path = Path.Combine(dir, FileName);
        if (!File.Exists(path)) return 0;
        using var file = SafetensorsFile.Open(path);
        var parameters = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        return WeightLoader.Copy(parameters, file, requireAll: false, "the trained weights do not fit the model");
    }
}
