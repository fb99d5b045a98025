using TorchSharp;
using VlmTune.Interop;
using static TorchSharp.torch;

namespace VlmTune.Autograd;

/// <summary>
/// Trims what TorchSharp 0.107's custom autograd functions keep per call beyond what PyTorch keeps:
/// <list type="bullet">
/// <item>for every output of a function called with autograd on, an <c>empty_like</c> copy (Node._outputCache), held
/// until the node's backward, only to build zeros if a gradient arrives undefined — one full activation per checkpointed
/// layer (60 MiB for InternVL2-2B at batch 8) and per NF4 linear in a recomputed layer (up to 240 MiB each);</item>
/// <item>our own handle on the tensor <c>forward</c> returned, which TorchSharp wraps in a new handle and leaves in the
/// caller's dispose scope until it ends (the whole decoder pass).</item>
/// </list>
/// A function's <c>forward</c> calls <see cref="Remember"/>; its caller calls <see cref="AfterApply"/> with the applied
/// output. The cache entries become zero-stride views of one zero (same shape and dtype, so a missing gradient still
/// materialises as zeros); the handle is released. The cache is TorchSharp-internal (<see cref="TorchSharpInternals"/>):
/// on a TorchSharp without it, the caches stay as TorchSharp keeps them, with a warning.
/// </summary>
public static class LeanAutograd
{
    [ThreadStatic] private static autograd.AutogradContext? _context;
    [ThreadStatic] private static Tensor? _forwardOutput;

    /// <summary>The node's per-output cache (null if TorchSharp no longer has it: tests pin it, so an upgrade fails loudly).</summary>
    internal static IReadOnlyList<Tensor>? OutputCacheOf(autograd.AutogradContext ctx) => TorchSharpInternals.OutputCache(ctx);

    /// <summary>Call from a custom function's forward with its context and the tensor it returns.</summary>
    public static void Remember(autograd.AutogradContext ctx, Tensor output)
    {
        _context = ctx;
        _forwardOutput = output;
    }

    /// <summary>Call right after <c>apply</c> returns <paramref name="applied"/> on the same thread. Returns it.</summary>
    public static Tensor AfterApply(Tensor applied)
    {
        var ctx = _context; var output = _forwardOutput;
        _context = null; _forwardOutput = null;
        if (output is not null && !ReferenceEquals(output, applied)) output.Dispose();
        if (ctx is null) return applied;
        if (TorchSharpInternals.OutputCache(ctx) is not { } cache)
        {
            TorchSharpInternals.WarnOnce("custom autograd functions keep TorchSharp's full-size output caches (more activation memory)");
            return applied;
        }
        for (int i = 0; i < cache.Count; i++)
        {
            if (cache[i] is not { } full || full.numel() <= 1) continue;
            var zero = zeros(1, full.dtype, full.device).expand(full.shape).DetachFromDisposeScope();
            full.Dispose();
            cache[i] = zero;
        }
        return applied;
    }
}
