using TorchSharp;
using static TorchSharp.torch;

namespace VlmTune.Models;

/// <summary>Random weights for shape-true benchmarks and training tests without a checkpoint.</summary>
public static class RandomInit
{
    /// <summary>Norm weights 1, biases 0, layer scales 0.1, every other weight N(0, std²).</summary>
    public static void Apply(nn.Module model, long seed, double std = 0.02)
    {
        using var noGrad = no_grad();
        // TorchSharp's Generator objects are CPU-only, so seed the global generators instead.
        random.manual_seed(seed);
        if (cuda.is_available()) cuda.manual_seed_all(seed);
        foreach (var (name, p) in model.named_parameters())
        {
            if (name.Contains(".lora_")) continue;
            string leaf = name[(name.LastIndexOf('.') + 1)..];
            bool isNorm = name.Contains("norm") || name.StartsWith("mlp1.0.");
            if (leaf == "bias") p.zero_();
            else if (isNorm) p.fill_(1.0);
            else if (leaf is "ls1" or "ls2") p.fill_(0.1);
            else p.normal_(0, std);
        }
    }
}
