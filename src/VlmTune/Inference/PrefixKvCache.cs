using System.Runtime.InteropServices;
using System.Security.Cryptography;
using static TorchSharp.torch;

namespace VlmTune.Inference;

/// <summary>
/// What identifies the keys and values of a prompt's first (i + 1) · <see cref="PromptBlocks.Size"/> tokens in one
/// engine: a hash chained over every block up to block i (token ids, the images whose features fill its image slots,
/// the adapter). Two prompts share a block hash only if they share everything before the block's end, so equal hashes
/// mean equal keys and values (the model and its RoPE base are the engine's).
/// </summary>
internal readonly record struct BlockHash(ulong H0, ulong H1, ulong H2, ulong H3);

/// <summary>The block hashes of a prompt (<see cref="InferenceEngine.Submit"/> computes them on the caller's thread).</summary>
internal static class PromptBlocks
{
    /// <summary>
    /// Tokens per block: the granularity at which prompts share cached keys and values. Small enough that prompts
    /// differing after a system prompt or an image still share it; large enough that a hit copies few tensors.
    /// </summary>
    public const int Size = 64;

    /// <summary>
    /// Hashes of every full block of <paramref name="ids"/>. <paramref name="images"/>: each image's key and tile count,
    /// in prompt order (its <paramref name="tokensPerTile"/> · tiles slots are the image-context tokens in order);
    /// <paramref name="adapterKey"/>: 0 for the base, else the adapter's own id (its LoRA changes every key and value).
    /// </summary>
    public static BlockHash[] Of(IReadOnlyList<int> ids, int imageContextId, IReadOnlyList<(ImageKey Key, long Tiles)>? images, int tokensPerTile, long adapterKey)
    {
        int blocks = ids.Count / Size;
        var hashes = new BlockHash[blocks];
        // Each image's slot range [start, end) among the image-context tokens.
        var ranges = new List<(long Start, long End, ImageKey Key)>();
        long slots = 0;
        foreach (var (key, tiles) in images ?? [])
        {
            ranges.Add((slots, slots + tiles * tokensPerTile, key));
            slots += tiles * tokensPerTile;
        }
        Span<byte> previous = stackalloc byte[32];
        previous.Clear();
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var buffer = new int[Size];
        long slot = 0;                  // image-context tokens before the current block
        for (int b = 0; b < blocks; b++)
        {
            sha.AppendData(previous);
            sha.AppendData(MemoryMarshal.AsBytes(new ReadOnlySpan<long>(in adapterKey)));
            long here = 0;
            for (int i = 0; i < Size; i++)
            {
                buffer[i] = ids[b * Size + i];
                if (buffer[i] == imageContextId) here++;
            }
            sha.AppendData(MemoryMarshal.AsBytes(buffer.AsSpan()));
            // The images whose slots this block holds (a key includes its tile shape, so the slot ranges follow).
            foreach (var (start, end, key) in ranges)
                if (here > 0 && start < slot + here && end > slot)
                    sha.AppendData(MemoryMarshal.AsBytes(new ReadOnlySpan<ImageKey>(in key)));
            slot += here;
            sha.GetHashAndReset(previous);
            var words = MemoryMarshal.Cast<byte, ulong>(previous);
            hashes[b] = new BlockHash(words[0], words[1], words[2], words[3]);
        }
        return hashes;
    }
}

/// <summary>Use of the prefix cache (<see cref="InferenceEngine.PrefixCache"/>).</summary>
/// <param name="Hits">Requests that reused at least one cached block.</param>
/// <param name="Misses">Requests looked up that reused none.</param>
/// <param name="ReusedTokens">Prompt tokens whose keys and values came from the cache instead of a prefill.</param>
/// <param name="Bytes">Bytes of the cached blocks now (at most <paramref name="CapacityBytes"/>).</param>
/// <param name="Blocks">Blocks cached now.</param>
/// <param name="Evictions">Blocks dropped to make room.</param>
/// <param name="CapacityBytes">The budget (<see cref="EngineOptions.PrefixCacheBytes"/>); 0: the cache is off.</param>
public readonly record struct PrefixCacheStats(long Hits, long Misses, long ReusedTokens, long Bytes, int Blocks, long Evictions, long CapacityBytes);

/// <summary>
/// Keys and values of prompt prefixes by <see cref="BlockHash"/>, one tensor (2 · layers, kv_heads, block, d) per block
/// on the model's device, bounded by bytes with least-recently-used eviction (automatic prefix caching, as vLLM and
/// SGLang do it). A lookup touches a prefix's blocks from the last to the first, so eviction takes a prefix's deepest
/// blocks before its shared start. The engine's loop is its only user; the lock keeps <see cref="Stats"/> consistent
/// for other threads.
/// </summary>
internal sealed class PrefixKvCache(long capacityBytes) : IDisposable
{
    private readonly Lock _lock = new();
    private readonly Dictionary<BlockHash, LinkedListNode<(BlockHash Hash, Tensor Entries, long Bytes)>> _index = [];
    private readonly LinkedList<(BlockHash Hash, Tensor Entries, long Bytes)> _lru = [];   // most recently used first
    private long _bytes, _hits, _misses, _reused, _evictions;
    private bool _disposed;

    public long CapacityBytes { get; } = capacityBytes;

    public PrefixCacheStats Stats
    {
        get { lock (_lock) return new(_hits, _misses, _reused, _bytes, _index.Count, _evictions, CapacityBytes); }
    }

    /// <summary>
    /// The keys and values of the longest cached run of leading blocks, at most <paramref name="maxBlocks"/>, as
    /// (2 · layers, kv_heads, n · Size, d) (a new tensor: later evictions do not touch it); null when none is cached.
    /// Counts the request as a hit or a miss.
    /// </summary>
    public Tensor? Take(IReadOnlyList<BlockHash> blocks, int maxBlocks)
    {
        lock (_lock)
        {
            if (_disposed) return null;
            var found = new List<LinkedListNode<(BlockHash, Tensor, long)>>();
            for (int b = 0; b < Math.Min(blocks.Count, maxBlocks) && _index.TryGetValue(blocks[b], out var node); b++) found.Add(node);
            if (found.Count == 0) { _misses++; return null; }
            for (int i = found.Count - 1; i >= 0; i--) { _lru.Remove(found[i]); _lru.AddFirst(found[i]); }
            _hits++;
            _reused += (long)found.Count * PromptBlocks.Size;
            var parts = found.Select(n => n.Value.Item2).ToArray();
            return parts.Length == 1 ? parts[0].clone() : cat(parts, 2);
        }
    }

    /// <summary>Whether block <paramref name="hash"/> is cached (no use is recorded).</summary>
    public bool Contains(BlockHash hash)
    {
        lock (_lock) return _index.ContainsKey(hash);
    }

    /// <summary>
    /// Caches blocks <paramref name="first"/>.. of a prompt from <paramref name="entries"/> (2 · layers, kv_heads,
    /// n · Size, d), whose columns start at block <paramref name="first"/>; blocks cached already are kept as they are.
    /// Room is made by evicting other prompts' blocks, never this prompt's own, so when the budget runs out the prompt
    /// keeps its leading blocks (what a later prompt can reuse) and the rest is not cached. Copies what it keeps: the
    /// caller still owns <paramref name="entries"/>.
    /// </summary>
    public void Add(IReadOnlyList<BlockHash> blocks, int first, Tensor entries)
    {
        int n = (int)(entries.shape[2] / PromptBlocks.Size);
        lock (_lock)
        {
            if (_disposed) return;
            var own = new HashSet<BlockHash>(blocks);
            var chain = new List<LinkedListNode<(BlockHash, Tensor, long)>>();
            for (int b = 0; b < first && _index.TryGetValue(blocks[b], out var earlier); b++) chain.Add(earlier);
            for (int i = 0; i < n; i++)
            {
                var hash = blocks[first + i];
                if (_index.TryGetValue(hash, out var cached)) { chain.Add(cached); continue; }
                using var view = entries.narrow(2, (long)i * PromptBlocks.Size, PromptBlocks.Size);
                long bytes = view.numel() * view.ElementSize;
                while (_bytes + bytes > CapacityBytes && _lru.Last is { } oldest && !own.Contains(oldest.Value.Hash)) Remove(oldest, evicted: true);
                if (_bytes + bytes > CapacityBytes) break;
                var copy = view.clone().DetachFromDisposeScope();
                var node = _lru.AddFirst((hash, copy, bytes));
                _index[hash] = node;
                _bytes += bytes;
                chain.Add(node);
            }
            // The chain's start most recent: eviction takes its deepest blocks first.
            for (int i = chain.Count - 1; i >= 0; i--) { _lru.Remove(chain[i]); _lru.AddFirst(chain[i]); }
        }
    }

    private void Remove(LinkedListNode<(BlockHash Hash, Tensor Entries, long Bytes)> node, bool evicted)
    {
        _lru.Remove(node);
        _index.Remove(node.Value.Hash);
        _bytes -= node.Value.Bytes;
        if (evicted) _evictions++;
        node.Value.Entries.Dispose();
    }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed) return;
            _disposed = true;
            while (_lru.First is { } node) Remove(node, evicted: false);
        }
    }
}
