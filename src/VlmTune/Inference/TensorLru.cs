using static TorchSharp.torch;

namespace VlmTune.Inference;

/// <summary>
/// Tensors by key, bounded by bytes, least recently used first out: the bookkeeping the engine's image-feature cache and
/// prefix cache share (each keeps its own lock, counters and policy). Owns every tensor it holds: an evicted one is
/// freed at once, the rest by <see cref="Clear"/>. Not thread-safe: its owner serialises calls.
/// </summary>
internal sealed class TensorLru<TKey>(long capacityBytes) where TKey : notnull
{
    private readonly Dictionary<TKey, LinkedListNode<(TKey Key, Tensor Value, long Bytes)>> _index = [];
    private readonly LinkedList<(TKey Key, Tensor Value, long Bytes)> _lru = [];   // most recently used first

    public long CapacityBytes { get; } = capacityBytes;
    public long Bytes { get; private set; }
    public int Count => _index.Count;
    public long Evictions { get; private set; }

    public bool Contains(TKey key) => _index.ContainsKey(key);

    /// <summary>The tensor of <paramref name="key"/> (still owned here), marked most recently used if <paramref name="touch"/>; null when absent.</summary>
    public Tensor? Find(TKey key, bool touch = true)
    {
        if (!_index.TryGetValue(key, out var node)) return null;
        if (touch) Touch(node);
        return node.Value.Value;
    }

    /// <summary>Marks <paramref name="key"/> (if held) most recently used.</summary>
    public void Touch(TKey key)
    {
        if (_index.TryGetValue(key, out var node)) Touch(node);
    }

    /// <summary>
    /// Evicts least recently used entries until <paramref name="bytes"/> more fit, stopping at the first that
    /// <paramref name="keep"/> protects; whether they fit now.
    /// </summary>
    public bool MakeRoom(long bytes, Func<TKey, bool>? keep = null)
    {
        while (Bytes + bytes > CapacityBytes && _lru.Last is { } oldest && (keep is null || !keep(oldest.Value.Key)))
        {
            Remove(oldest);
            Evictions++;
        }
        return Bytes + bytes <= CapacityBytes;
    }

    /// <summary>Takes <paramref name="value"/> (detached from any dispose scope) as the most recently used entry; the caller made room.</summary>
    public void Add(TKey key, Tensor value, long bytes)
    {
        value.DetachFromDisposeScope();
        _index[key] = _lru.AddFirst((key, value, bytes));
        Bytes += bytes;
    }

    /// <summary>Frees every entry (not counted as evictions).</summary>
    public void Clear()
    {
        while (_lru.First is { } node) Remove(node);
    }

    private void Touch(LinkedListNode<(TKey, Tensor, long)> node)
    {
        _lru.Remove(node);
        _lru.AddFirst(node);
    }

    private void Remove(LinkedListNode<(TKey Key, Tensor Value, long Bytes)> node)
    {
        _lru.Remove(node);
        _index.Remove(node.Value.Key);
        Bytes -= node.Value.Bytes;
        node.Value.Value.Dispose();
    }
}
