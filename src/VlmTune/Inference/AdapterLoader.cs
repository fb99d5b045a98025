using VlmTune.Checkpoints;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Inference;

/// <summary>
/// Applies a trained LoRA adapter folder for inference: the LLM adapter (PEFT files at the top of the folder) and, if
/// present, the vision adapter in <c>vision_lora/</c> (the layout <c>vlmtune train</c> writes) are loaded and merged into
/// the base weights, as PEFT's merge_and_unload, so decoding costs what the base model costs; trained non-LoRA weights
/// of a checkpoint (<c>trainable.safetensors</c>, e.g. the projector) replace the base ones.
/// </summary>
public static class AdapterLoader
{
    public const string VisionAdapterDir = "vision_lora";

    /// <summary>Returns how many layers were merged; throws <see cref="CheckpointException"/> naming what does not fit.</summary>
    public static int ApplyMerged(InternVLChatModel model, string dir)
    {
        if (!Directory.Exists(dir)) throw new CheckpointException($"{dir}: adapter folder not found.");
        bool llm = File.Exists(Path.Combine(dir, PeftAdapter.ConfigFile));
        var visionDir = Path.Combine(dir, VisionAdapterDir);
        bool vision = File.Exists(Path.Combine(visionDir, PeftAdapter.ConfigFile));
        if (!llm && !vision)
            throw new CheckpointException($"{dir}: no {PeftAdapter.ConfigFile} (LLM adapter) or {VisionAdapterDir}/{PeftAdapter.ConfigFile} (vision adapter) found.");
        int merged = 0;
        // A vlmtune checkpoint also carries the non-LoRA weights it trained (the projector by default).
        TrainedWeights.LoadIfPresent(model, dir);
        if (llm)
        {
            PeftAdapter.Load(model.language_model, dir, ScalarType.Float32);
            merged += LoraMerge.MergeInto(model.language_model);
        }
        if (vision)
        {
            PeftAdapter.Load(model.vision_model, visionDir, ScalarType.Float32);
            merged += LoraMerge.MergeInto(model.vision_model);
        }
        return merged;
    }
}
