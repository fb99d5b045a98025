using TorchSharp;
using static TorchSharp.torch;

namespace VlmTune.Models;

/// <summary>One adapter's LoRA branch on one linear layer: A (r, in), B (out, r), PEFT's scaling alpha / r.</summary>
public sealed record LoraBranch(Tensor A, Tensor B, double Scaling);

/// <summary>
/// The LoRA branches of one served adapter, by the linear layer each adapts. They live beside the model, never in it:
/// the base weights stay unmerged and shared by every adapter (S-LoRA), and loading or dropping an adapter never
/// touches a module that a running forward pass reads. Owns its tensors.
/// </summary>
public sealed class LoraBranches : IDisposable
{
    private readonly Dictionary<Linear, LoraBranch> _branches;

    public LoraBranches(IReadOnlyDictionary<Linear, LoraBranch> branches)
    {
        _branches = new Dictionary<Linear, LoraBranch>(branches, ReferenceEqualityComparer.Instance);
        foreach (var b in _branches.Values) { b.A.DetachFromDisposeScope(); b.B.DetachFromDisposeScope(); }
    }

    public int Count => _branches.Count;

    /// <summary>Elements of the A and B matrices together (for logs: what the adapter costs beside the base).</summary>
    public long Elements => _branches.Values.Sum(b => b.A.numel() + b.B.numel());

    public LoraBranch? For(Linear linear) => _branches.GetValueOrDefault(linear);

    public bool IsDisposed { get; private set; }

    public void Dispose()
    {
        if (IsDisposed) return;
        IsDisposed = true;
        foreach (var b in _branches.Values) { b.A.Dispose(); b.B.Dispose(); }
    }
}

/// <summary>
/// Which rows of one forward pass take which adapter's LoRA deltas (batched LoRA, as S-LoRA / punica): every
/// <see cref="Linear"/> computes its base product for the whole batch once, then adds x_g·Aᵀ·Bᵀ·scale for each group
/// g of rows that share an adapter; rows of the base model (null) get nothing. Rows are the first dimension of every
/// linear input: sequences in the decoder, image tiles in the vision encoder and projector.
///
/// The routing holds for the length of a <c>using</c> on the thread that runs the pass, as <c>no_grad()</c> does:
/// the families' modules call <c>Linear.forward(x)</c> with no room for it, and a pass on another thread (another
/// engine on the same model) must not see it.
/// </summary>
public sealed class LoraRouting : IDisposable
{
    [ThreadStatic] private static LoraRouting? _current;

    // Long-lived, as Init.NegativeInfinity: a Scalar temporary may be finalised while the native call reads it.
    private static readonly Scalar One = 1.ToScalar();

    private readonly LoraRouting? _outer;
    private readonly (LoraBranches Adapter, Tensor? Rows)[] _groups;   // Rows null: every row of the pass
    private readonly long _rowCount;
    private bool _disposed;

    /// <summary>The routing of the pass running on this thread; null outside one (or when no row has an adapter).</summary>
    public static LoraRouting? Current => _current;

    private LoraRouting((LoraBranches, Tensor?)[] groups, long rowCount)
    {
        _groups = groups;
        _rowCount = rowCount;
        _outer = _current;
        _current = groups.Length == 0 ? null : this;
    }

    /// <summary>Routes row i of the next passes on this thread to <paramref name="rowAdapters"/>[i] (null: the base) until disposed.</summary>
    public static LoraRouting Begin(IReadOnlyList<LoraBranches?> rowAdapters, Device device)
    {
        var byAdapter = new Dictionary<LoraBranches, List<long>>(ReferenceEqualityComparer.Instance);
        for (int i = 0; i < rowAdapters.Count; i++)
            if (rowAdapters[i] is { } a)
            {
                if (a.IsDisposed) throw new ObjectDisposedException(nameof(LoraBranches), "an adapter's weights were freed while a request still used them.");
                if (!byAdapter.TryGetValue(a, out var rows)) byAdapter[a] = rows = [];
                rows.Add(i);
            }
        var groups = byAdapter.Select(g => (g.Key, g.Value.Count == rowAdapters.Count
            ? null
            : tensor(g.Value.ToArray(), device: device).DetachFromDisposeScope())).ToArray();
        return new LoraRouting(groups, rowAdapters.Count);
    }

    /// <summary>Distinct adapters routed (the base not counted).</summary>
    public int Adapters => _groups.Length;

    /// <summary>
    /// <paramref name="y"/> (the layer's base output for <paramref name="x"/>) plus each group's delta on its rows, as
    /// PEFT computes it unmerged: in the branch's dtype (fp32), scaled, then cast to y's dtype.
    /// </summary>
    public Tensor Apply(Linear linear, Tensor x, Tensor y)
    {
        // A pass that split or merged its rows (micro-batches, flattened tokens) would give rows to the wrong adapters.
        if (x.shape[0] != _rowCount)
            throw new InvalidOperationException($"a linear input has {x.shape[0]} rows where the LoRA routing has {_rowCount}.");
        foreach (var (adapter, rows) in _groups)
        {
            if (adapter.For(linear) is not { } branch) continue;
            var h = (rows is null ? x : x.index_select(0, rows)).to_type(branch.A.dtype);             // (rows, …, in)
            var delta = nn.functional.linear(nn.functional.linear(h, branch.A), branch.B);              // (rows, …, out)
            var scaled = (delta * branch.Scaling).to_type(y.dtype);
            y = rows is null ? y + scaled : y.index_add(0, rows, scaled, One);
        }
        return y;
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _current = _outer;
        foreach (var (_, rows) in _groups) rows?.Dispose();
    }
}
