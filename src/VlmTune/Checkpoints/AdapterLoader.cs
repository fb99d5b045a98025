using TorchSharp;
using VlmTune.Models;
using VlmTune.Quantization;
using static TorchSharp.torch;

namespace VlmTune.Checkpoints;

/// <summary>How an adapter is put on a loaded model (base + adapter, unmerged).</summary>
public sealed record AdapterApplyOptions
{
    /// <summary>
    /// Store the LLM's decoder linear weights in NF4 (as QLoRA trained them) instead of running the adapter on the
    /// original weights. Off by default, matching <c>vlmtune merge</c>, which merges into the original weights.
    /// </summary>
    public bool Nf4Base { get; init; }
    /// <summary>With <see cref="Nf4Base"/>: dequantise with our CUDA kernel (<see cref="RuntimeSwitches.Nf4Kernel"/>).</summary>
    public bool Nf4Kernel { get; init; } = true;
    /// <summary>
    /// Fold the LoRA branches into the loaded weights afterwards (fp32, rounded once to the model dtype), so decoding
    /// costs what the base model costs (serving). Not with <see cref="Nf4Base"/>.
    /// </summary>
    public bool MergeIntoWeights { get; init; }
    /// <summary>Dtype of the LoRA A/B matrices (the branch output is cast to the layer's dtype).</summary>
    public ScalarType LoraDType { get; init; } = ScalarType.Float32;
}

/// <summary>What <see cref="AdapterLoader.Apply"/> did: a one-line description, LoRA layers attached (or merged) and trained tensors loaded.</summary>
public sealed record AppliedAdapter(string Description, int LoraLayers, int TrainedTensors, bool Merged);

/// <summary>
/// Runs a fine-tuned adapter on a loaded base model (<c>vlmtune chat --adapter</c>, the server), unmerged or merged in memory:
/// trained full weights replace the base ones, then each LoRA adapter gets its branches on the LLM, the vision
/// encoder or the whole model. Accepts what <see cref="AdapterCheckpoint.Open"/> accepts.
/// </summary>
public static class AdapterLoader
{
    /// <summary>Applies the adapter in <paramref name="dir"/> to <paramref name="model"/>; every problem is reported before the model changes.</summary>
    public static AppliedAdapter Apply(InternVLChatModel model, string dir, AdapterApplyOptions? options = null)
    {
        options ??= new AdapterApplyOptions();
        if (options.MergeIntoWeights && options.Nf4Base)
            throw new VlmTuneException($"{dir}: an adapter cannot be both merged into the weights and run on an NF4 base; merge into NF4 weights with vlmtune merge --merge-into-nf4 instead.");
        if (PeftAdapter.LoraLinears(model).Any())
            throw new VlmTuneException($"{dir}: the model already has LoRA branches; apply one adapter to a freshly loaded base model.");
        var shapes = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.shape);
        using var adapter = AdapterCheckpoint.Open(dir, shapes);

        int trained = TrainedWeights.LoadIfPresent(model, adapter.Dir);
        if (options.Nf4Base) Qlora.QuantizeLanguageModel(model.language_model, cudaKernel: options.Nf4Kernel);
        foreach (var part in adapter.Loras)
        {
            nn.Module scope = part.Root switch
            {
                "language_model." => model.language_model,
                "vision_model." => model.vision_model,
                _ => model,
            };
            PeftAdapter.Attach(scope, part.Config, options.LoraDType);
            PeftAdapter.LoadWeights(scope, part.Weights);
        }
        if (options.MergeIntoWeights) LoraMerge.MergeInto(model);
        return new AppliedAdapter(adapter.Describe() + (options.MergeIntoWeights ? " (merged into the loaded weights)" : ""),
            adapter.LoraModuleCount, trained, options.MergeIntoWeights);
    }
}
