using static TorchSharp.torch;

namespace VlmTune.Autograd;

/// <summary>
/// Gradients that custom backward functions hand to the autograd engine. The engine may call them on its own thread,
/// outside any dispose scope of ours, so our handle is kept here. The engine copies a returned gradient as soon as the
/// backward callback returns, so when the next custom backward on the same thread hands over its gradient, the earlier
/// handle is no longer needed and is released: at most one gradient per engine thread is held here, not one per layer
/// for the whole pass (with NF4 layers that was ~12 GB for InternVL2-2B at batch 8 × 1900 tokens). Per thread, because
/// another thread's newest gradient may not have been handed over yet.
/// </summary>
public static class BackwardScratch
{
    [ThreadStatic] private static List<Tensor>? _pending;

    public static void Keep(Tensor t)
    {
        t.DetachFromDisposeScope();
        var pending = _pending ??= [];
        foreach (var earlier in pending) earlier.Dispose();
        pending.Clear();
        pending.Add(t);
    }

    /// <summary>Call after <c>loss.backward()</c> returns, on the thread that called it (the CPU engine's thread).</summary>
    public static void Release()
    {
        if (_pending is null) return;
        foreach (var t in _pending) t.Dispose();
        _pending.Clear();
    }
}
