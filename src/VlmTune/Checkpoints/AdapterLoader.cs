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

    /// <summary>
    /// The adapter in <paramref name="dir"/> as LoRA branches beside <paramref name="model"/>, for serving several
    /// adapters over one unmerged base (<see cref="LoraRouting"/>); the model is not changed. Validated as
    /// <see cref="Apply"/> validates (every problem at once). LoRA of the LLM, the vision encoder and the projector is
    /// taken; an adapter that also trained non-LoRA weights (<c>trainable.safetensors</c>: the projector, the whole LLM
    /// in full mode) is refused, as those weights would replace base weights every other request shares.
    /// <paramref name="name"/> is what errors call the adapter.
    /// </summary>
    public static (LoraBranches Branches, string Description) LoadBranches(InternVLChatModel model, string dir, string name)
    {
        if (PeftAdapter.LoraLinears(model).Any())
            throw new VlmTuneException($"adapter '{name}': the base model has LoRA branches of its own; serve adapters over a freshly loaded base model.");
        var shapes = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.shape);
        using var adapter = AdapterCheckpoint.Open(dir, shapes);
        if (adapter.FullWeights is { } full)
        {
            string parts = string.Join(", ", full.Entries.Keys.Select(k => k.Split('.')[0]).Distinct().Order(StringComparer.Ordinal));
            throw new CheckpointException($"adapter '{name}': it also trained non-LoRA weights ({TrainedWeights.FileName}: {parts}), which would replace " +
                "base weights that the base model and every other adapter share; serve it alone (a bare --adapter PATH) or merge it (vlmtune merge) and serve the merged model.");
        }
        var linears = Linear.AllIn(model).ToDictionary(l => l.Name, l => l.Linear, StringComparer.Ordinal);
        var device = model.Options.Device;
        var branches = new Dictionary<Linear, LoraBranch>(ReferenceEqualityComparer.Instance);
        try
        {
            foreach (var part in adapter.Loras)
                foreach (var module in part.Modules)
                {
                    var linear = linears[module.Module];
                    if (branches.ContainsKey(linear)) throw new CheckpointException($"adapter '{name}': module '{module.Module}' has LoRA tensors in two of its adapter folders.");
                    using var scope = NewDisposeScope();
                    // fp32 on the model's device, as AdapterApplyOptions.LoraDType keeps unmerged branches.
                    var a = part.Weights.Read(module.AKey).to(ScalarType.Float32, device).contiguous().DetachFromDisposeScope();
                    var b = part.Weights.Read(module.BKey).to(ScalarType.Float32, device).contiguous().DetachFromDisposeScope();
                    branches[linear] = new LoraBranch(a, b, part.Config.Scaling);
                }
        }
        catch
        {
            foreach (var br in branches.Values) { br.A.Dispose(); br.B.Dispose(); }
            throw;
        }
        return (new LoraBranches(branches), adapter.Describe());
    }
}
