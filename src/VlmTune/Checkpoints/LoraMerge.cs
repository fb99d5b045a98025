using TorchSharp;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Checkpoints;

/// <summary>
/// Folds LoRA branches into their base weights as PEFT's merge_and_unload does: W ← W + (B·A)·alpha/r, computed in fp32
/// and rounded once to the stored dtype, then the branch is removed.
/// </summary>
public static class LoraMerge
{
    /// <summary>The merged weight of one layer (stored dtype, same device), leaving the layer unchanged.</summary>
    public static Tensor MergedWeight(Linear linear, string name = "layer")
    {
        if (!linear.HasLora) throw new InvalidOperationException($"{name} has no LoRA branch.");
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var w = linear.weight.to_type(ScalarType.Float32);
        var delta = matmul(linear.lora_B!.weight.to_type(ScalarType.Float32), linear.lora_A!.weight.to_type(ScalarType.Float32)) * linear.LoraScaling;
        var merged = w + delta.to(w.device);
        if (!merged.isfinite().all().item<bool>())
            throw new VlmTuneException($"merging the LoRA branch of '{name}' gives non-finite weights (its LoRA A/B hold NaN or inf, or overflow); the adapter is corrupt.");
        return merged.to_type(linear.weight.dtype).MoveToOuterDisposeScope();
    }

    /// <summary>Merges every LoRA branch under <paramref name="scope"/> into its weight; returns how many were merged.</summary>
    public static int MergeInto(nn.Module scope)
    {
        var layers = PeftAdapter.LoraLinears(scope).ToList();
        // Compute all merged weights first, so a non-finite one leaves the model untouched.
        var merged = layers.Select(l => MergedWeight(l.Linear, l.Name)).ToList();
        using var noGrad = no_grad();
        for (int i = 0; i < layers.Count; i++)
        {
            layers[i].Linear.weight.copy_(merged[i]);
            merged[i].Dispose();
            layers[i].Linear.RemoveLora();
        }
        return layers.Count;
    }
}
