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
