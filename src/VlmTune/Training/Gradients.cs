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

/// <summary>
/// The gradients one kernel launch reads (its pointer table), each a new <c>.grad</c> handle, all released together
/// once the table is built: a gradient held twice makes autograd accumulate the next one out of place (a new tensor,
/// and a table rebuild, every step).
/// </summary>
internal sealed class GradientHandles(string user) : IDisposable
{
    private readonly List<Tensor> _held = [];

    public Tensor Of(Tensor parameter)
    {
        var g = parameter.grad ?? throw new InvalidOperationException($"{user}: a tensor has no gradient");
        _held.Add(g);
        return g;
    }

    public void Dispose()
    {
        foreach (var g in _held) g.Dispose();
        _held.Clear();
    }
}
