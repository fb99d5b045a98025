using TorchSharp;
using TorchSharp.Modules;
using VlmTune.Checkpoints;
using static TorchSharp.torch;

namespace VlmTune.Training;

/// <summary>
/// fp32 master copies of trainable parameters that the model holds in a lower precision (bf16 full fine-tuning), as
/// mixed-precision optimizers keep them: the optimizer updates the masters with the model's gradients widened to fp32,
/// then the model's weights are rounded from the masters once per step. Small updates therefore accumulate instead of
/// vanishing under bf16 rounding. fp32 parameters (LoRA, CPU runs) are their own master.
/// With a master device (optimizer offload, QLoRA's paged optimizer done as ZeRO-Offload does it), every master lives
/// in host memory: the GPU keeps only the model's weights and gradients, and AdamW runs on the CPU.
/// </summary>
public sealed class MasterWeights : IDisposable
{
    public sealed record Pair(string Name, Parameter Model, Parameter Master)
    {
        public bool Distinct => !ReferenceEquals(Model, Master);
    }

    public IReadOnlyList<Pair> Pairs { get; }

    private MasterWeights(IReadOnlyList<Pair> pairs) => Pairs = pairs;

    public static MasterWeights Create(IEnumerable<(string Name, Parameter Param)> trainable, Device? masterDevice = null)
    {
        var pairs = new List<Pair>();
        foreach (var (name, p) in trainable)
        {
            if (p.dtype == ScalarType.Float32 && (masterDevice is null || masterDevice.type == p.device.type)) { pairs.Add(new Pair(name, p, p)); continue; }
            Parameter master;
            using (no_grad())
                master = new Parameter(p.detach().to_type(ScalarType.Float32).to(masterDevice ?? p.device).DetachFromDisposeScope(), requires_grad: true);
            master.DetachFromDisposeScope();
            pairs.Add(new Pair(name, p, master));
        }
        return new MasterWeights(pairs);
    }

    /// <summary>What the optimizer updates.</summary>
    public IEnumerable<Parameter> OptimizerParameters => Pairs.Select(p => p.Master);

    public bool Any => Pairs.Any(p => p.Distinct);

    /// <summary>Adds each model gradient, widened to fp32, to its master's gradient and clears the model's.</summary>
    public void GradientsToMasters()
    {
        foreach (var pair in Pairs.Where(p => p.Distinct))
        {
            using var g = pair.Model.grad;
            if (g is null) continue;
            // Every temporary goes at once: left to the GC, a step's widened copies of 150M gradients stayed on the GPU.
            // Moved first, widened after: an offloaded master gets half the bytes over PCIe.
            using (var scope = NewDisposeScope())
                pair.Master.backward([g.to(pair.Master.device).to_type(ScalarType.Float32)]);   // a leaf's backward accumulates into its .grad
            using (no_grad()) g.zero_().Dispose();
        }
    }

    /// <summary>Gives every optimized tensor that has no gradient a zero one, so that it takes part in the optimizer step.</summary>
    public void FillMissingGradients()
    {
        using var noGrad = no_grad();
        foreach (var master in OptimizerParameters)
            if (!Gradients.Has(master))
            {
                using var zero = zeros_like(master);
                master.grad = zero;   // the parameter keeps its own reference
            }
    }

    /// <summary>Rounds the masters into the model's weights (after an optimizer step or a resume).</summary>
    public void MastersToModel()
    {
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        foreach (var pair in Pairs.Where(p => p.Distinct)) pair.Model.copy_(pair.Master);
    }

    public void ZeroModelGradients()
    {
        Gradients.Zero(Pairs.Where(p => p.Distinct).Select(p => (Tensor)p.Model));
    }

    /// <summary>
    /// Reads the masters (saved in fp32) from a checkpoint file and rounds them into the model; <paramref name="nameInFile"/>
    /// maps a parameter's name to the file's (PEFT adapters name tensors their own way), null for "not in this file".
    /// </summary>
    public void Load(SafetensorsFile file, Func<string, string?>? nameInFile = null)
    {
        using (no_grad())
            foreach (var pair in Pairs.Where(p => p.Distinct))
            {
                var key = nameInFile is null ? pair.Name : nameInFile(pair.Name);
                if (key is null || !file.Contains(key)) continue;
                using var value = file.Read(key);
                pair.Master.copy_(value);
            }
        MastersToModel();
    }

    public void Dispose()
    {
        foreach (var pair in Pairs.Where(p => p.Distinct)) pair.Master.Dispose();
    }
}
