using static TorchSharp.torch;

namespace VlmTune.Models;

/// <summary>
/// Pre-allocated keys and values of every decoder layer, (B, kv_heads, capacity, d) each, grown by doubling when full.
/// Keys are stored rotated; if dynamic-NTK changes the RoPE base as the sequence grows, the cached keys are re-rotated
/// so decoding with the cache gives what a full recomputation gives.
///
/// A cache may hold spare rows (<see cref="Stack"/>'s rowCapacity): rows then join (<see cref="TryAppendRows"/>) and
/// leave (<see cref="RemoveRow"/>) in place, where rebuilding a continuous batch's cache would allocate and copy all
/// of it (12.5 GB at 64 rows of ~2,000 tokens of InternVL2-2B) each time one sequence joins or leaves. The first
/// <see cref="Batch"/> rows of the storage are the cache; every tensor the rest of the code sees is a view of them.
/// </summary>
public sealed class KvCache : IDisposable
{
    private Tensor[] _keyStore, _valueStore;   // (row capacity, kv_heads, capacity, d)
    private Tensor _positionStore;             // (row capacity, capacity)
    private Tensor[] _keys;                    // the first Batch rows of the stores
    private Tensor[] _values;
    private Tensor _positions;   // (B, capacity) positions of the cached entries
    private double _theta = double.NaN;

    public long Length { get; private set; }
    public long Capacity => _keys[0].shape[2];
    public long Batch => _keys[0].shape[0];
    /// <summary>Rows the storage holds (≥ <see cref="Batch"/>): room for rows to join in place.</summary>
    public long RowCapacity => _keyStore[0].shape[0];

    public KvCache(LlmConfig c, long batch, long capacity, ScalarType dtype, Device device)
    {
        capacity = Math.Max(capacity, 1);
        _keyStore = new Tensor[c.NumHiddenLayers];
        _valueStore = new Tensor[c.NumHiddenLayers];
        for (int i = 0; i < c.NumHiddenLayers; i++)
        {
            _keyStore[i] = zeros(new long[] { batch, c.NumKeyValueHeads, capacity, c.HeadDim }, dtype, device).DetachFromDisposeScope();
            _valueStore[i] = zeros(new long[] { batch, c.NumKeyValueHeads, capacity, c.HeadDim }, dtype, device).DetachFromDisposeScope();
        }
        // The cache outlives the dispose scopes of the passes that fill it.
        _positionStore = zeros(new long[] { batch, capacity }, ScalarType.Int64, device).DetachFromDisposeScope();
        (_keys, _values, _positions) = ([], [], _positionStore);
        SetRows(batch);
    }

    private KvCache(Tensor[] keyStore, Tensor[] valueStore, Tensor positionStore, long rows, long length, double theta)
    {
        _keyStore = keyStore; _valueStore = valueStore; _positionStore = positionStore; Length = length; _theta = theta;
        (_keys, _values, _positions) = ([], [], _positionStore);
        SetRows(rows);
    }

    /// <summary>Makes the first <paramref name="rows"/> rows of the storage the cache (new views; the old ones are released).</summary>
    private void SetRows(long rows)
    {
        foreach (var t in _keys.Concat(_values)) t.Dispose();
        if (!ReferenceEquals(_positions, _positionStore)) _positions.Dispose();
        _keys = _keyStore.Select(t => t.narrow(0, 0, rows).DetachFromDisposeScope()).ToArray();
        _values = _valueStore.Select(t => t.narrow(0, 0, rows).DetachFromDisposeScope()).ToArray();
        _positions = _positionStore.narrow(0, 0, rows).DetachFromDisposeScope();
    }

    /// <summary>
    /// A new cache whose rows are the newest <see cref="KvRow.Length"/> entries of the given rows of other caches,
    /// right-aligned: every row's last entry sits in the result's last used column, and the columns before a shorter
    /// row's entries are zero padding that a KeyMask must hide. This is how a continuous batch adds and drops sequences
    /// without recomputing them. All sources must share one RoPE base (the keys are stored rotated).
    /// </summary>
    /// <param name="rowCapacity">Rows to allocate (at least the rows given): spare ones let rows join later in place.</param>
    public static KvCache Stack(IReadOnlyList<KvRow> rows, long capacity, long rowCapacity = 0)
    {
        if (rows.Count == 0) throw new ArgumentException("Stack needs at least one row.", nameof(rows));
        var first = rows[0].Source;
        double theta = rows.Select(r => r.Source._theta).FirstOrDefault(t => !double.IsNaN(t), double.NaN);
        if (rows.Any(r => !double.IsNaN(r.Source._theta) && r.Source._theta != theta))
            throw new InvalidOperationException("Cannot stack caches rotated with different RoPE bases.");
        long length = rows.Max(r => r.Length);
        capacity = Math.Max(capacity, Math.Max(length, 1));
        long n = rows.Count, allocated = Math.Max(n, rowCapacity);
        var keys = new Tensor[first._keys.Length];
        var values = new Tensor[first._keys.Length];
        for (int layer = 0; layer < keys.Length; layer++)
        {
            var k0 = first._keys[layer];
            var shape = new[] { allocated, k0.shape[1], capacity, k0.shape[3] };
            keys[layer] = zeros(shape, k0.dtype, k0.device).DetachFromDisposeScope();
            values[layer] = zeros(shape, k0.dtype, k0.device).DetachFromDisposeScope();
        }
        var positions = zeros(new[] { allocated, capacity }, ScalarType.Int64, first._positions.device).DetachFromDisposeScope();

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
        return new KvCache(keys, values, positions, n, length, theta);
    }

    /// <summary>
    /// Appends <paramref name="rows"/> (the newest entries of rows of other caches) as rows of this cache, in the spare
    /// rows of its storage, right-aligned to its <see cref="Length"/>: what <see cref="Stack"/> of this cache's rows plus
    /// these would hold (the columns before a new row's entries keep whatever they held; the KeyMask hides them).
    /// False (nothing changed) when the rows do not fit: too few spare rows, a row longer than this cache's entries,
    /// or another RoPE base.
    /// </summary>
    public bool TryAppendRows(IReadOnlyList<KvRow> rows)
    {
        if (Batch + rows.Count > RowCapacity || rows.Any(r => r.Length > Length || r.Length > (r.End ?? r.Source.Length))) return false;
        if (rows.Any(r => !double.IsNaN(r.Source._theta) && !double.IsNaN(_theta) && r.Source._theta != _theta)) return false;
        using var scope = NewDisposeScope();
        for (int j = 0; j < rows.Count; j++)
        {
            var (source, row, take, end) = rows[j];
            long sourceEnd = end ?? source.Length, target = Batch + j;
            if (take == 0) continue;
            for (int layer = 0; layer < _keyStore.Length; layer++)
            {
                _keyStore[layer][target].narrow(1, Length - take, take).copy_(source._keys[layer][row].narrow(1, sourceEnd - take, take));
                _valueStore[layer][target].narrow(1, Length - take, take).copy_(source._values[layer][row].narrow(1, sourceEnd - take, take));
            }
            _positionStore[target].narrow(0, Length - take, take).copy_(source._positions[row].narrow(0, sourceEnd - take, take));
        }
        if (double.IsNaN(_theta)) _theta = rows.Select(r => r.Source._theta).FirstOrDefault(t => !double.IsNaN(t), double.NaN);
        SetRows(Batch + rows.Count);
        return true;
    }

    /// <summary>Drops row <paramref name="row"/>: the last row takes its place (one row copied), the cache has one row less.</summary>
    public void RemoveRow(long row)
    {
        if (row < 0 || row >= Batch) throw new ArgumentOutOfRangeException(nameof(row), row, $"the cache has {Batch} rows");
        long last = Batch - 1;
        if (row != last)
        {
            using var scope = NewDisposeScope();
            for (int layer = 0; layer < _keyStore.Length; layer++)
            {
                _keyStore[layer][row].copy_(_keyStore[layer][last]);
                _valueStore[layer][row].copy_(_valueStore[layer][last]);
            }
            _positionStore[row].copy_(_positionStore[last]);
        }
        SetRows(last);
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
        // The grown storage holds the cache's rows only: spare rows are given up (a later join rebuilds the batch).
        for (int i = 0; i < _keys.Length; i++)
        {
            _keyStore[i] = Grow(_keys[i], _keyStore[i], grown, 2);
            _valueStore[i] = Grow(_values[i], _valueStore[i], grown, 2);
        }
        _positionStore = Grow(_positions, _positionStore, grown, 1);
        SetRows(Batch);
    }

    private static Tensor Grow(Tensor rows, Tensor store, long capacity, int dim)
    {
        var shape = rows.shape.ToArray();
        shape[dim] = capacity;
        var bigger = zeros(shape, rows.dtype, rows.device).DetachFromDisposeScope();
        bigger.narrow(dim, 0, rows.shape[dim]).copy_(rows);
        store.Dispose();
        return bigger;
    }

    public void Dispose()
    {
        foreach (var t in _keys.Concat(_values)) t.Dispose();
        if (!ReferenceEquals(_positions, _positionStore)) _positions.Dispose();
        foreach (var t in _keyStore.Concat(_valueStore)) t.Dispose();
        _positionStore.Dispose();
    }
}

/// <summary>
/// The newest <paramref name="Length"/> entries of row <paramref name="Row"/> of <paramref name="Source"/>, or with
/// <paramref name="End"/> the <paramref name="Length"/> entries before column End (a prefix of what the row holds).
/// </summary>
public readonly record struct KvRow(KvCache Source, long Row, long Length, long? End = null);
