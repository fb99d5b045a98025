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
    /// Hashes of every full block of <paramref name="ids"/>. <paramref name="slotsBefore"/>: the image-context tokens
    /// before each position (element i: among the first i). <paramref name="images"/>: each image's key and tile count,
    /// in prompt order (its <paramref name="tokensPerTile"/> · tiles slots are the image-context tokens in order);
    /// <paramref name="adapterKey"/>: 0 for the base, else the adapter's own id (its LoRA changes every key and value).
    /// </summary>
    public static BlockHash[] Of(IReadOnlyList<int> ids, int[] slotsBefore, IReadOnlyList<(ImageKey Key, long Tiles)>? images, int tokensPerTile, long adapterKey)
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
        for (int b = 0; b < blocks; b++)
        {
            sha.AppendData(previous);
            sha.AppendData(MemoryMarshal.AsBytes(new ReadOnlySpan<long>(in adapterKey)));
            for (int i = 0; i < Size; i++) buffer[i] = ids[b * Size + i];
            sha.AppendData(MemoryMarshal.AsBytes(buffer.AsSpan()));
            long slot = slotsBefore[b * Size], here = slotsBefore[(b + 1) * Size] - slot;   // this block's image slots
            // The images whose slots this block holds (a key includes its tile shape, so the slot ranges follow).
            foreach (var (start, end, key) in ranges)
                if (here > 0 && start < slot + here && end > slot)
                    sha.AppendData(MemoryMarshal.AsBytes(new ReadOnlySpan<ImageKey>(in key)));
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
    private readonly TensorLru<BlockHash> _blocks = new(capacityBytes);
    private long _hits, _misses, _reused;
    private bool _disposed;

    public long CapacityBytes => _blocks.CapacityBytes;

    public PrefixCacheStats Stats
    {
        get { lock (_lock) return new(_hits, _misses, _reused, _blocks.Bytes, _blocks.Count, _blocks.Evictions, CapacityBytes); }
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
            var parts = new List<Tensor>();
            for (int b = 0; b < Math.Min(blocks.Count, maxBlocks) && _blocks.Find(blocks[b], touch: false) is { } part; b++) parts.Add(part);
            if (parts.Count == 0) { _misses++; return null; }
            TouchFromTheEnd(blocks.Take(parts.Count));
            _hits++;
            _reused += (long)parts.Count * PromptBlocks.Size;
            return parts.Count == 1 ? parts[0].clone() : cat(parts.ToArray(), 2);
        }
    }

    /// <summary>Whether block <paramref name="hash"/> is cached (no use is recorded).</summary>
    public bool Contains(BlockHash hash)
    {
        lock (_lock) return _blocks.Contains(hash);
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
            int held = first;                                   // the prompt's blocks cached from its start
            for (int i = 0; i < n; i++, held++)
            {
                var hash = blocks[first + i];
                if (_blocks.Contains(hash)) continue;
                using var view = entries.narrow(2, (long)i * PromptBlocks.Size, PromptBlocks.Size);
                long bytes = view.numel() * view.ElementSize;
                if (!_blocks.MakeRoom(bytes, keep: own.Contains)) break;
                _blocks.Add(hash, view.clone(), bytes);
            }
            TouchFromTheEnd(blocks.Take(held));
        }
    }

    /// <summary>Marks a prefix's blocks used, its start last (most recent): eviction takes its deepest blocks first.</summary>
    private void TouchFromTheEnd(IEnumerable<BlockHash> prefix)
    {
        foreach (var hash in prefix.Reverse()) _blocks.Touch(hash);
    }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed) return;
            _disposed = true;
            _blocks.Clear();
        }
    }
}
