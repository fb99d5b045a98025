using System.Globalization;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using VlmTune.Checkpoints;
using VlmTune.Models;
using VlmTune.Vision;
using static TorchSharp.torch;

namespace VlmTune.Data;

/// <summary>A sample's images as the cache knows them: the entry key and each image's tile count.</summary>
public sealed record VisionCacheEntry(string Key, int[] TilesPerImage)
{
    public int Tiles => TilesPerImage.Sum();
}

/// <summary>
/// On-disk cache of what a frozen vision tower gives for a sample's images (cache_vision_features): the pixel-shuffled
/// InternViT features (tiles, 256, 4C) right before the mlp1 projector, in the training dtype, one safetensors file per
/// distinct image list. The key is a SHA-256 over the images' bytes, the tiling options and a fingerprint of the vision
/// tower (its config, the identity of the weight files holding it, the dtype), so an entry is never used after any of
/// them changed. Files are written to a temporary sibling and renamed: concurrent writers of one key (data-parallel
/// ranks) each leave a complete file, and a reader never sees half of one. Writes run in the background (at most
/// <see cref="MaxPendingWrites"/> at once, served from memory until on disk), so the trainer does not wait for the disk.
/// See docs/training.md.
/// </summary>
public sealed class VisionFeatureCache : IDisposable
{
    /// <summary>Entries being written at once; a store beyond that waits for one to finish (bounds the memory held).</summary>
    public const int MaxPendingWrites = 8;
    /// <summary>Part of every key: bump it when the image preprocessing or the ViT code changes what features come out.</summary>
    public const int FormatVersion = 1;
    public const string TensorName = "features";
    private const string Extension = ".safetensors";

    private readonly ScalarType _dtype;
    private readonly Action<string> _warn;
    private long _hits, _misses, _stored, _storedBytes, _storeFailures;
    private readonly SemaphoreSlim _writeSlots = new(MaxPendingWrites);
    // Entries queued for writing (key → CPU features): lookups take them from here until the file exists.
    private readonly Dictionary<string, (VisionCacheEntry Entry, Tensor Features)> _pending = new(StringComparer.Ordinal);

    public string Directory { get; }
    /// <summary>SHA-256 (hex) over the vision tower's config, its weight files' identity and the dtype.</summary>
    public string ModelFingerprint { get; }
    /// <summary>Entries and bytes found when the cache was opened.</summary>
    public long EntriesAtOpen { get; }
    public long BytesAtOpen { get; }

    /// <summary>Lookups that found a usable entry / that did not (a sample found late by <see cref="TryLoadStored"/> counts both).</summary>
    public long Hits => Interlocked.Read(ref _hits);
    public long Misses => Interlocked.Read(ref _misses);
    /// <summary>Entries this process wrote, and their bytes.</summary>
    public long Stored => Interlocked.Read(ref _stored);
    public long StoredBytes => Interlocked.Read(ref _storedBytes);

    private VisionFeatureCache(string directory, string fingerprint, ScalarType dtype, Action<string> warn, long entries, long bytes)
    {
        Directory = directory; ModelFingerprint = fingerprint; _dtype = dtype; _warn = warn; EntriesAtOpen = entries; BytesAtOpen = bytes;
    }

    /// <summary>Opens (creating it if needed) the cache folder for the vision tower of <paramref name="modelDir"/> run in <paramref name="dtype"/>.</summary>
    /// <param name="nf4">The ViT's linears run in NF4 (quantize_vision), which changes its output.</param>
    /// <param name="warn">Receives problems that cost only the cache's benefit (an unreadable entry, a failed write).</param>
    public static VisionFeatureCache Open(string directory, string modelDir, InternVLConfig config, ScalarType dtype, bool nf4, Action<string> warn)
    {
        string dir = Path.GetFullPath(directory);
        System.IO.Directory.CreateDirectory(dir);
        long entries = 0, bytes = 0;
        var staleBefore = DateTime.UtcNow - TimeSpan.FromHours(1);
        foreach (var file in new DirectoryInfo(dir).EnumerateFiles("*", SearchOption.AllDirectories))
        {
            if (file.Name.EndsWith(Extension, StringComparison.Ordinal)) { entries++; bytes += file.Length; }
            // A write that a kill interrupted leaves its temporary file; a live write is milliseconds old.
            else if (file.Name.Contains(Extension + ".tmp-", StringComparison.Ordinal) && file.LastWriteTimeUtc < staleBefore)
                try { file.Delete(); } catch (IOException) { }
        }
        return new VisionFeatureCache(dir, Fingerprint(modelDir, config, dtype, nf4), dtype, warn, entries, bytes);
    }

    /// <summary>
    /// What the vision features depend on besides the images: the ViT and pixel-shuffle settings of config.json, the
    /// vision_model.* tensors' files (name, size, modification time) and header entries, the dtype, NF4 weights or not,
    /// and this code's <see cref="FormatVersion"/>. Weight files are identified, not hashed (hundreds of MB): replacing or
    /// editing one changes its size or time.
    /// </summary>
    public static string Fingerprint(string modelDir, InternVLConfig config, ScalarType dtype, bool nf4 = false)
    {
        var text = new StringBuilder();
        text.Append(CultureInfo.InvariantCulture, $"vlmtune vision features v{FormatVersion}\n");
        text.Append(JsonSerializer.Serialize(config.Vision)).Append('\n');
        text.Append(CultureInfo.InvariantCulture,
            $"select_layer={config.SelectLayer} downsample_ratio={config.DownsampleRatio:R} ps_version={config.PsVersion} force_image_size={config.ForceImageSize} dtype={dtype} weights={(nf4 ? "nf4-block64-double-quant" : "as stored")}\n");
        using var weights = ModelWeights.Open(modelDir, config);   // official names in either layout
        foreach (var name in weights.Names.Where(n => n.StartsWith("vision_model.", StringComparison.Ordinal)).Order(StringComparer.Ordinal))
        {
            var e = weights.Entry(name);
            var file = new FileInfo(weights.FileOf(name));
            text.Append(CultureInfo.InvariantCulture,
                $"{name} {e.DType} [{string.Join(",", e.Shape)}] {e.Begin} {file.Name} {file.Length} {file.LastWriteTimeUtc.Ticks}\n");
        }
        return Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(text.ToString())));
    }

    /// <summary>The key of a sample's images (their encoded file bytes, in order) under these tiling options.</summary>
    public string KeyFor(IReadOnlyList<byte[]> images, ImageProcessorOptions options)
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        sha.AppendData(Encoding.UTF8.GetBytes(string.Create(CultureInfo.InvariantCulture,
            $"{ModelFingerprint}\nimage_size={options.ImageSize} min_tiles={options.MinTiles} max_tiles={options.MaxTiles} thumbnail={options.UseThumbnail}\nimages={images.Count}\n")));
        foreach (var bytes in images) sha.AppendData(SHA256.HashData(bytes));
        return Convert.ToHexStringLower(sha.GetHashAndReset());
    }

    /// <summary>The entry's file: a two-character fan-out keeps folders small on large data sets.</summary>
    public string PathOf(string key) => Path.Combine(Directory, key[..2], key + Extension);

    /// <summary>
    /// The cached features (tiles, 256, 4C) and tile counts of <paramref name="imageCount"/> images under
    /// <paramref name="key"/>, read now into CPU memory; null (a miss) when absent or unusable.
    /// </summary>
    public (int[] TilesPerImage, Tensor Features)? TryLoad(string key, int imageCount)
    {
        if (FromPending(key, imageCount) is { } queued) { Interlocked.Increment(ref _hits); return queued; }
        string path = PathOf(key);
        if (!File.Exists(path)) { Interlocked.Increment(ref _misses); return null; }
        try
        {
            using var file = SafetensorsFile.Open(path);
            string? problem = null;
            int[] tiles = [];
            if (!file.Metadata.TryGetValue("key", out var stored) || stored != key) problem = "its key does not match its file name";
            else if (!file.Metadata.TryGetValue("tiles_per_image", out var list) || !TryParseTiles(list, out tiles) || tiles.Length != imageCount)
                problem = $"its tiles_per_image metadata does not describe {imageCount} image(s)";
            else if (!file.Entries.TryGetValue(TensorName, out var entry)) problem = $"it has no '{TensorName}' tensor";
            else if (entry.Shape.Length != 3 || entry.Shape[0] != tiles.Sum() || SafetensorsFile.ToScalarType(entry.DType) != _dtype)
                problem = $"'{TensorName}' is {entry.DType} [{string.Join(", ", entry.Shape)}], expected {_dtype} [{tiles.Sum()}, tokens, channels]";
            if (problem is null)
            {
                var features = file.Read(TensorName);
                Interlocked.Increment(ref _hits);
                return (tiles, features);
            }
            _warn($"vision cache: ignoring {path}: {problem}; the features are computed again");
        }
        catch (Exception e) when (e is VlmTuneException or IOException or UnauthorizedAccessException)
        {
            _warn($"vision cache: ignoring unreadable {path} ({e.Message}); the features are computed again");
        }
        Interlocked.Increment(ref _misses);
        return null;
    }

    /// <summary>
    /// The features of <paramref name="entry"/> if its file exists now (written after the sample was encoded, by an
    /// earlier batch or another rank), checked against the entry's tile counts; null otherwise, not counted as a miss again.
    /// </summary>
    public Tensor? TryLoadStored(VisionCacheEntry entry)
    {
        if (!IsPending(entry.Key) && !File.Exists(PathOf(entry.Key))) return null;
        if (TryLoad(entry.Key, entry.TilesPerImage.Length) is not (var tiles, var features)) return null;
        if (tiles.SequenceEqual(entry.TilesPerImage)) return features;
        features.Dispose();
        _warn($"vision cache: ignoring {PathOf(entry.Key)}: it holds {string.Join(",", tiles)} tiles per image but the sample has {string.Join(",", entry.TilesPerImage)}");
        return null;
    }

    /// <summary>
    /// Stores the features (tiles, 256, 4C) of one sample's images (any device; in the cache's dtype) unless the entry
    /// exists already (another rank wrote it) or is being written. The features are copied to host memory now and
    /// written in the background; <see cref="Flush"/> waits for the writes. A failed write (disk full, ...) costs only
    /// the cache's benefit: it is warned about once, and training goes on.
    /// </summary>
    public void Store(VisionCacheEntry entry, Tensor features)
    {
        if (features.shape.Length != 3 || features.shape[0] != entry.Tiles || features.dtype != _dtype)
            throw new ArgumentException($"features {features.dtype} [{string.Join(", ", features.shape)}] do not fit entry {entry.Key} ({entry.Tiles} tiles, {_dtype}).");
        string path = PathOf(entry.Key);
        if (IsPending(entry.Key) || File.Exists(path)) return;
        _writeSlots.Wait();
        // A copy of our own: the caller's tensor (a view of the batch's features) is freed with the batch.
        var copy = features.detach().to(CPU, copy: true).contiguous().DetachFromDisposeScope();
        lock (_pending) _pending[entry.Key] = (entry, copy);
        Task.Run(() =>
        {
            try { Write(entry, copy, path); }
            finally
            {
                lock (_pending) _pending.Remove(entry.Key);
                copy.Dispose();
                _writeSlots.Release();
            }
        });
    }

    private void Write(VisionCacheEntry entry, Tensor features, string path)
    {
        try
        {
            System.IO.Directory.CreateDirectory(Path.GetDirectoryName(path)!);
            var metadata = new Dictionary<string, string>
            {
                ["key"] = entry.Key,
                ["tiles_per_image"] = string.Join(",", entry.TilesPerImage),
                ["model_fingerprint"] = ModelFingerprint,
                ["format_version"] = FormatVersion.ToString(CultureInfo.InvariantCulture),
            };
            SafetensorsWriter.Write(path, [new(TensorName, features)], metadata);
            Interlocked.Increment(ref _stored);
            Interlocked.Add(ref _storedBytes, new FileInfo(path).Length);
        }
        catch (Exception e)
        {
            // Whatever went wrong, only this entry is lost; the run must not fail for its cache.
            if (Interlocked.Increment(ref _storeFailures) == 1)
                _warn($"vision cache: cannot write {path} ({e.Message}); training goes on, computing the features of uncached samples every epoch (further write failures are not reported)");
        }
    }

    /// <summary>Waits until every stored entry is on disk.</summary>
    public void Flush()
    {
        for (int i = 0; i < MaxPendingWrites; i++) _writeSlots.Wait();
        _writeSlots.Release(MaxPendingWrites);
    }

    /// <summary>Waits for the pending writes.</summary>
    public void Dispose() => Flush();

    private bool IsPending(string key)
    {
        lock (_pending) return _pending.ContainsKey(key);
    }

    /// <summary>A copy of an entry still being written, or null.</summary>
    private (int[] TilesPerImage, Tensor Features)? FromPending(string key, int imageCount)
    {
        lock (_pending)
        {
            if (!_pending.TryGetValue(key, out var queued) || queued.Entry.TilesPerImage.Length != imageCount) return null;
            return (queued.Entry.TilesPerImage, queued.Features.clone());
        }
    }

    private static bool TryParseTiles(string text, out int[] tiles)
    {
        var parts = text.Split(',');
        tiles = new int[parts.Length];
        for (int i = 0; i < parts.Length; i++)
            if (!int.TryParse(parts[i], NumberStyles.None, CultureInfo.InvariantCulture, out tiles[i]) || tiles[i] < 1) return false;
        return true;
    }
}
