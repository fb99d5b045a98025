using VlmTune.Checkpoints;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Tests.Support;

/// <summary>
/// PEFT adapters for the tiny model with random A and B (B is zero in a fresh LoRA, which would change nothing),
/// written with VlmTune's own PEFT writer: adapters of another rank, alpha and set of targets than the fixture's.
/// </summary>
public static class AdapterFolders
{
    /// <summary>An LLM LoRA on <paramref name="targets"/> in <paramref name="dir"/> (created), plus a ViT LoRA in vision_lora/ when given.</summary>
    public static string Write(string dir, int seed, int r, double alpha, string[] targets, string[]? visionTargets = null, double std = 0.2)
    {
        using var model = InternVLModelLoader.Load(Fixtures.TinyModel, new ModelOptions());
        var g = new Generator((ulong)seed);
        void Part(nn.Module scope, string folder, PeftAdapterConfig config)
        {
            PeftAdapter.Attach(scope, config);
            using (no_grad())
                foreach (var (_, linear) in PeftAdapter.LoraLinears(scope))
                {
                    linear.lora_A!.weight.copy_(randn(linear.lora_A.weight.shape, generator: g) * std);
                    linear.lora_B!.weight.copy_(randn(linear.lora_B.weight.shape, generator: g) * std);
                }
            PeftAdapter.Save(scope, folder, config);
        }
        Part(model.language_model, dir, new PeftAdapterConfig { R = r, LoraAlpha = alpha, TargetModules = targets });
        if (visionTargets is not null)
            Part(model.vision_model, Path.Combine(dir, IterCheckpoint.VisionAdapterDir), new PeftAdapterConfig { R = r, LoraAlpha = alpha, TargetModules = visionTargets, TaskType = null });
        return dir;
    }

    /// <summary>A copy of the adapter in <paramref name="source"/> that also trained the projector (<c>trainable.safetensors</c>).</summary>
    public static string WithTrainedProjector(string source, string dir)
    {
        Directory.CreateDirectory(dir);
        foreach (var file in Directory.GetFiles(source)) File.Copy(file, Path.Combine(dir, Path.GetFileName(file)));
        using var model = InternVLModelLoader.Load(Fixtures.TinyModel, new ModelOptions());
        var projector = model.named_parameters().Where(p => p.name.StartsWith("mlp1.", StringComparison.Ordinal))
            .Select(p => new KeyValuePair<string, Tensor>(p.name, p.parameter)).ToList();
        TrainedWeights.Save(dir, projector);
        return dir;
    }
}
