using TorchSharp;
using static TorchSharp.torch;

namespace VlmTune.Training;

/// <summary>
/// Reading and zeroing <c>.grad</c> without leaving handles to the finaliser: every <c>.grad</c> read is a new handle,
/// and TorchSharp's <c>zero_()</c> returns another (Optimizer.zero_grad drops it), so each is disposed here. Left to the
/// GC, a step left two handles per trainable tensor behind (TensorLifetimeTests).
/// </summary>
internal static class Gradients
{
    public static bool Has(Tensor t)
    {
        using var g = t.grad;
        return g is not null;
    }

    /// <summary>Zeroes each tensor's gradient in place where it has one (the optimizer's zero_grad, without the leak).</summary>
    public static void Zero(IEnumerable<Tensor> tensors)
    {
        using var noGrad = no_grad();
        foreach (var t in tensors)
        {
            using var g = t.grad;
            g?.zero_().Dispose();
        }
    }
}
