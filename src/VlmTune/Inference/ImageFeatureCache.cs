using System.Runtime.InteropServices;
using System.Security.Cryptography;
using TorchSharp;
using static TorchSharp.torch;

namespace VlmTune.Inference;

/// <summary>
/// What identifies an image's projected features in one engine: the SHA-256 of its tiles as submitted (dtype, shape
/// and bytes) and the vision adapter in effect (0: the base's ViT and projector; an adapter with LoRA on the vision
/// encoder or the projector has an id of its own, never reused). The engine serves one model, so the model is implied.
/// </summary>
internal readonly record struct ImageKey(ulong H0, ulong H1, ulong H2, ulong H3, long Vision)
{
    /// <summary>The key of <paramref name="tiles"/> (n, 3, H, W), read on the CPU (a device tensor is copied there first).</summary>
    public static ImageKey Of(Tensor tiles, long vision)
    {
        using var scope = NewDisposeScope();
        var cpu = tiles.device_type == DeviceType.CPU ? tiles.contiguous() : tiles.cpu().contiguous();
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        // The dtype and shape first: equal bytes of another dtype or tiling are another image.
        var header = new long[] { (long)cpu.dtype }.Concat(cpu.shape).ToArray();
        sha.AppendData(MemoryMarshal.AsBytes(header.AsSpan()));
        long bytes = cpu.numel() * cpu.ElementSize;
        unsafe
        {
            byte* p = (byte*)Cuda.TensorPointers.DataPointer(cpu);   // element 0 of this image (storage offset included)
            for (long done = 0; done < bytes;)
            {
                int chunk = (int)Math.Min(bytes - done, 1 << 30);
                sha.AppendData(new ReadOnlySpan<byte>(p + done, chunk));
                done += chunk;
            }
        }
        Span<byte> h = stackalloc byte[32];
        sha.GetHashAndReset(h);
        var words = MemoryMarshal.Cast<byte, ulong>(h);
        return new ImageKey(words[0], words[1], words[2], words[3], vision);
    }
}

/// <summary>Hits, misses and what the image-feature cache holds (<see cref="InferenceEngine.ImageCache"/>).</summary>
/// <param name="Hits">Images whose features came from the cache (or from the same vision pass as an equal image of another request).</param>
/// <param name="Misses">Images the vision encoder and projector ran for while the cache is on.</param>
/// <param name="Bytes">Bytes of the cached feature tensors now (at most <paramref name="CapacityBytes"/>).</param>
/// <param name="Entries">Images cached now.</param>
/// <param name="Evictions">Entries dropped to make room.</param>
/// <param name="CapacityBytes">The budget (<see cref="EngineOptions.ImageCacheBytes"/>); 0: the cache is off.</param>
public readonly record struct ImageCacheStats(long Hits, long Misses, long Bytes, int Entries, long Evictions, long CapacityBytes);

/// <summary>
/// Projected image features (tiles, 256, D) on the model's device in its dtype, by <see cref="ImageKey"/>, bounded by
/// bytes with least-recently-used eviction. The cache owns every tensor it holds: an evicted entry is freed at once,
/// and what is left when the cache is disposed. The engine's loop is its only user; the lock keeps the counters and the
/// list consistent for readers on other threads (<see cref="Stats"/>) and for dispose.
/// </summary>
internal sealed class ImageFeatureCache(long capacityBytes) : IDisposable
{
    private readonly Lock _lock = new();
    private readonly TensorLru<ImageKey> _entries = new(capacityBytes);
    private long _hits, _misses;
    private bool _disposed;

    public long CapacityBytes => _entries.CapacityBytes;

    public ImageCacheStats Stats
    {
        get { lock (_lock) return new(_hits, _misses, _entries.Bytes, _entries.Count, _entries.Evictions, CapacityBytes); }
    }

    /// <summary>
    /// The cached features of <paramref name="key"/>, marked most recently used; null when absent. The tensor stays the
    /// cache's: use it before the next <see cref="Add"/>, which may evict it.
    /// </summary>
    public Tensor? Find(ImageKey key)
    {
        lock (_lock) return _disposed ? null : _entries.Find(key);
    }

    /// <summary>Counts images served from the cache (<paramref name="hits"/>) and images the vision pass ran for.</summary>
    public void Count(long hits, long misses)
    {
        lock (_lock) { _hits += hits; _misses += misses; }
    }

    /// <summary>
    /// Takes <paramref name="features"/> into the cache, evicting the least recently used entries until it fits; false
    /// (the caller keeps it) when it alone exceeds the budget or the key is cached already.
    /// </summary>
    public bool Add(ImageKey key, Tensor features)
    {
        long bytes = features.numel() * features.ElementSize;
        lock (_lock)
        {
            if (_disposed || bytes > CapacityBytes || _entries.Contains(key)) return false;
            _entries.MakeRoom(bytes);
            _entries.Add(key, features, bytes);
            return true;
        }
    }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed) return;
            _disposed = true;
            _entries.Clear();
        }
    }
}
