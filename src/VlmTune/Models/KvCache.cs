using static TorchSharp.torch;

namespace VlmTune.Models;

/// <summary>
/// Pre-allocated keys and values of every decoder layer, (B, kv_heads, capacity, d) each, grown by doubling when full.
/// Keys are stored rotated; if dynamic-NTK changes the RoPE base as the sequence grows, the cached keys are re-rotated
/// so decoding with the cache gives what a full recomputation gives.
/// </summary>
public sealed class KvCache : IDisposable
{
    private readonly Tensor[] _keys;
    private readonly Tensor[] _values;
    private Tensor _positions;   // (B, capacity) positions of the cached entries
    private double _theta = double.NaN;

    public long Length { get; private set; }
    public long Capacity => _keys[0].shape[2];
    public long Batch => _keys[0].shape[0];

    public KvCache(LlmConfig c, long batch, long capacity, ScalarType dtype, Device device)
    {
        capacity = Math.Max(capacity, 1);
        _keys = new Tensor[c.NumHiddenLayers];
        _values = new Tensor[c.NumHiddenLayers];
        for (int i = 0; i < c.NumHiddenLayers; i++)
        {
            _keys[i] = zeros(new long[] { batch, c.NumKeyValueHeads, capacity, c.HeadDim }, dtype, device).DetachFromDisposeScope();
            _values[i] = zeros(new long[] { batch, c.NumKeyValueHeads, capacity, c.HeadDim }, dtype, device).DetachFromDisposeScope();
        }
        // The cache outlives the dispose scopes of the passes that fill it.
        _positions = zeros(new long[] { batch, capacity }, ScalarType.Int64, device).DetachFromDisposeScope();
    }

    private KvCache(Tensor[] keys, Tensor[] values, Tensor positions, long length, double theta)
    {
        _keys = keys; _values = values; _positions = positions; Length = length; _theta = theta;
    }

    /// <summary>
    /// A new cache whose rows are the newest <see cref="KvRow.Length"/> entries of the given rows of other caches,
    /// right-aligned: every row's last entry sits in the result's last used column, and the columns before a shorter
    /// row's entries are zero padding that a KeyMask must hide. This is how a continuous batch adds and drops sequences
    /// without recomputing them. All sources must share one RoPE base (the keys are stored rotated).
    /// </summary>
    public static KvCache Stack(IReadOnlyList<KvRow> rows, long capacity)
    {
        if (rows.Count == 0) throw new ArgumentException("Stack needs at least one row.", nameof(rows));
        var first = rows[0].Source;
        double theta = rows.Select(r => r.Source._theta).FirstOrDefault(t => !double.IsNaN(t), double.NaN);
        if (rows.Any(r => !double.IsNaN(r.Source._theta) && r.Source._theta != theta))
            throw new InvalidOperationException("Cannot stack caches rotated with different RoPE bases.");
        long length = rows.Max(r => r.Length);
        capacity = Math.Max(capacity, Math.Max(length, 1));
        long n = rows.Count;
        var keys = new Tensor[first._keys.Length];
        var values = new Tensor[first._keys.Length];
        for (int layer = 0; layer < keys.Length; layer++)
        {
            var k0 = first._keys[layer];
            var shape = new[] { n, k0.shape[1], capacity, k0.shape[3] };
            keys[layer] = zeros(shape, k0.dtype, k0.device).DetachFromDisposeScope();
            values[layer] = zeros(shape, k0.dtype, k0.device).DetachFromDisposeScope();
        }
        var positions = zeros(new[] { n, capacity }, ScalarType.Int64, first._positions.device).DetachFromDisposeScope();

        // Copy runs of consecutive rows of one source at once: one gather per run and layer, not per row.
        using var scope = NewDisposeScope();
        int start = 0;
        while (start < rows.Count)
        {
            var source = rows[start].Source;
            long sourceEnd = rows[start].End ?? source.Length;
            int end = start + 1;
            while (end < rows.Count && ReferenceEquals(rows[end].Source, source) && (rows[end].End ?? source.Length) == sourceEnd) end++;
            long take = rows.Skip(start).Take(end - start).Max(r => r.Length);
            if (take > sourceEnd || sourceEnd > source.Length)
                throw new ArgumentException($"Rows of {take} entries ending at column {sourceEnd} do not fit their cache of {source.Length}.", nameof(rows));
            if (take == 0) { start = end; continue; }
            var index = tensor(rows.Skip(start).Take(end - start).Select(r => r.Row).ToArray(), device: source._positions.device);
            // Source rows end at sourceEnd; the result's rows end at `length`. Taking `take` columns may bring along a
            // shorter row's padding (or stale entries): they land before that row's start and stay masked.
            for (int layer = 0; layer < keys.Length; layer++)
            {
                keys[layer].narrow(0, start, end - start).narrow(2, length - take, take)
                    .copy_(source._keys[layer].index_select(0, index).narrow(2, sourceEnd - take, take));
                values[layer].narrow(0, start, end - start).narrow(2, length - take, take)
                    .copy_(source._values[layer].index_select(0, index).narrow(2, sourceEnd - take, take));
            }
            positions.narrow(0, start, end - start).narrow(1, length - take, take)
                .copy_(source._positions.index_select(0, index).narrow(1, sourceEnd - take, take));
            start = end;
        }
        return new KvCache(keys, values, positions, length, theta);
    }

    /// <summary>Writes this pass's keys/values after the cached ones; returns views of everything so far, (B, kvh, S, d).</summary>
    public (Tensor Keys, Tensor Values) Append(int layer, Tensor k, Tensor v)
    {
        long t = k.shape[2];
        EnsureCapacity(Length + t);
        _keys[layer].narrow(2, Length, t).copy_(k);
        _values[layer].narrow(2, Length, t).copy_(v);
        return (_keys[layer].narrow(2, 0, Length + t), _values[layer].narrow(2, 0, Length + t));
    }

    internal void Advance(Tensor positions, double theta)
    {
        long t = positions.shape[1];
        _positions.narrow(1, Length, t).copy_(positions.expand(Batch, t));
        Length += t;
        _theta = theta;
    }

    internal void Rerotate(RotaryEmbedding rope, double theta)
    {
        if (Length == 0 || double.IsNaN(_theta) || theta == _theta) return;
        using var scope = NewDisposeScope();
        var positions = _positions.narrow(1, 0, Length);
        foreach (var k in _keys)
        {
            var cached = k.narrow(2, 0, Length);
            cached.copy_(RotaryTables.Rerotate(rope, cached, positions, _theta, theta));
        }
        _theta = theta;
    }

    // Direct access for kernels that read and write the cache themselves (the fused CUDA decoder).
    internal Tensor KeysOf(int layer) => _keys[layer];
    internal Tensor ValuesOf(int layer) => _values[layer];
    /// <summary>(B, capacity) int64 positions of the cached entries.</summary>
    internal Tensor PositionsTensor => _positions;
    /// <summary>The RoPE base the cached keys are rotated with (NaN while empty).</summary>
    internal double Theta => _theta;

    /// <summary>Grows the cache so that <paramref name="more"/> entries fit after the current ones.</summary>
    internal void Reserve(long more) => EnsureCapacity(Length + more);

    /// <summary>Counts <paramref name="t"/> entries (keys, values and positions) that a kernel wrote after the cached ones.</summary>
    internal void AdvanceWritten(long t, double theta)
    {
        Length += t;
        _theta = theta;
    }

    /// <summary>
    /// Entries [<paramref name="start"/>, start + <paramref name="count"/>) of row <paramref name="row"/>, every layer's
    /// keys then values: a new (2 · layers, kv_heads, count, d) tensor (<see cref="LoadPrefix"/> reads it back).
    /// </summary>
    internal Tensor ExportEntries(long row, long start, long count)
    {
        if (start < 0 || count < 0 || start + count > Length) throw new ArgumentOutOfRangeException(nameof(count), $"entries [{start}, {start + count}) of a cache of {Length}");
        using var scope = NewDisposeScope();
        var parts = new Tensor[2 * _keys.Length];
        for (int layer = 0; layer < _keys.Length; layer++)
        {
            parts[2 * layer] = _keys[layer][row].narrow(1, start, count);
            parts[2 * layer + 1] = _values[layer][row].narrow(1, start, count);
        }
        return stack(parts).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Fills an empty one-row cache with the first entries of a prompt, as <see cref="ExportEntries"/> gave them
    /// ((2 · layers, kv_heads, n, d), positions 0..n−1), rotated with RoPE base <paramref name="theta"/>.
    /// </summary>
    internal void LoadPrefix(Tensor entries, double theta)
    {
        if (Length != 0 || Batch != 1) throw new InvalidOperationException("A prefix loads into an empty one-row cache.");
        long n = entries.shape[2];
        EnsureCapacity(n);
        using var scope = NewDisposeScope();
        for (int layer = 0; layer < _keys.Length; layer++)
        {
            _keys[layer][0].narrow(1, 0, n).copy_(entries[2 * layer]);
            _values[layer][0].narrow(1, 0, n).copy_(entries[2 * layer + 1]);
        }
        _positions[0].narrow(0, 0, n).copy_(arange(n, device: _positions.device));
        Length = n;
        _theta = theta;
    }

    /// <summary>Drops everything after the first <paramref name="length"/> entries (e.g. to reuse a shared prefix).</summary>
    public void Truncate(long length) => Length = Math.Min(Length, Math.Max(0, length));

    private void EnsureCapacity(long needed)
    {
        if (needed <= Capacity) return;
        long grown = Math.Max(needed, Capacity * 2);
        for (int i = 0; i < _keys.Length; i++)
        {
            _keys[i] = Grow(_keys[i], grown, 2);
            _values[i] = Grow(_values[i], grown, 2);
        }
        _positions = Grow(_positions, grown, 1);
    }

    private static Tensor Grow(Tensor t, long capacity, int dim)
    {
        var shape = t.shape.ToArray();
        shape[dim] = capacity;
        var bigger = zeros(shape, t.dtype, t.device).DetachFromDisposeScope();
        bigger.narrow(dim, 0, t.shape[dim]).copy_(t);
        t.Dispose();
        return bigger;
    }

    public void Dispose()
    {
        foreach (var t in _keys.Concat(_values)) t.Dispose();
        _positions.Dispose();
    }
}

/// <summary>
/// The newest <paramref name="Length"/> entries of row <paramref name="Row"/> of <paramref name="Source"/>, or with
/// <paramref name="End"/> the <paramref name="Length"/> entries before column End (a prefix of what the row holds).
/// </summary>
public readonly record struct KvRow(KvCache Source, long Row, long Length, long? End = null);
