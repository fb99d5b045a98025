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
        var merged = Merged(linear.weight.to_type(ScalarType.Float32), linear.lora_A!.weight.to_type(ScalarType.Float32),
            linear.lora_B!.weight.to_type(ScalarType.Float32), linear.LoraScaling, name);
        return merged.to(linear.weight.dtype, linear.weight.device).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// W + (B·A)·<paramref name="scaling"/> in fp32 (W: (out, in), A: (r, in), B: (out, r)), refusing non-finite
    /// results; the caller rounds once to the stored dtype.
    /// </summary>
    public static Tensor Merged(Tensor weight, Tensor loraA, Tensor loraB, double scaling, string name)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var w = weight.to_type(ScalarType.Float32);
        var delta = matmul(loraB.to(ScalarType.Float32, w.device), loraA.to(ScalarType.Float32, w.device)) * scaling;   // (out, in)
        var merged = w + delta;
        if (!merged.isfinite().all().item<bool>())
            throw new VlmTuneException($"merging the LoRA branch of '{name}' gives non-finite weights (its LoRA A/B hold NaN or inf, or overflow); the adapter is corrupt.");
        return merged.MoveToOuterDisposeScope();
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
