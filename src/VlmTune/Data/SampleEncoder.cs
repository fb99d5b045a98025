using VlmTune.Text;
using VlmTune.Vision;
using static TorchSharp.torch;

namespace VlmTune.Data;

/// <summary>
/// One sample ready for the model: token ids, labels and its images' tiles, either as pixels for the vision tower or,
/// from the vision feature cache, as the tower's output.
/// </summary>
public sealed class EncodedSample(string id, int[] inputIds, int[] labels, Tensor? pixels, int tiles) : IDisposable
{
    public string Id { get; } = id;
    public int[] InputIds { get; } = inputIds;
    public int[] Labels { get; } = labels;
    /// <summary>(tiles, 3, 448, 448) fp32, or null for a text-only sample.</summary>
    public Tensor? Pixels { get; } = pixels;
    public int Tiles { get; } = tiles;
    /// <summary>Pixel-shuffled ViT features (tiles, 256, 4C) from the vision feature cache; Pixels is then null.</summary>
    public Tensor? CachedFeatures { get; init; }
    /// <summary>The cache entry to store this sample's ViT features under (cache on, features not cached yet).</summary>
    public VisionCacheEntry? StoreAs { get; init; }

    public void Dispose()
    {
        Pixels?.Dispose();
        CachedFeatures?.Dispose();
    }
}

/// <summary>
/// Turns samples into model inputs exactly as InternVL's training dataset does: each image decoded and tiled
/// (dynamic_preprocess with the sample's max tiles, thumbnail), the conversation tokenised with labels masked by
/// preprocess_internlm, image tokens expanded to 256 × tiles. With a <see cref="VisionCache"/>, a sample whose images'
/// features are cached is not decoded: it comes with those features instead of pixels.
/// </summary>
public sealed class SampleEncoder(ConversationTokenizer tokenizer, ImageProcessorOptions images, DataCounters counters, Action<string> warn)
{
    private long _imagesDecoded;

    public ConversationTokenizer Tokenizer { get; } = tokenizer;
    /// <summary>Where frozen vision features are looked up (null: off).</summary>
    public VisionFeatureCache? VisionCache { get; init; }
    /// <summary>Images decoded and tiled by <see cref="Encode"/> so far (all threads).</summary>
    public long ImagesDecoded => Interlocked.Read(ref _imagesDecoded);

    // Several images share the sample's budget, as in the official fine-tuning dataset (and in data validate).
    private ImageProcessorOptions OptionsFor(TrainingSample s) => images.ForImages(s.Images.Count, TileSharing.SplitBetweenImages, s.MaxDynamicPatch);

    /// <summary>
    /// Token length (images counted from their headers, not decoded), positive for samples with images and negative
    /// for text-only ones as XTuner's modality_length; null when the sample is dropped (problem counted and warned).
    /// </summary>
    public long? MeasureLength(TrainingSample s)
    {
        var options = OptionsFor(s);
        var tiles = new List<int>();
        foreach (var path in s.Images)
        {
            try
            {
                var info = ImageDecoder.ReadInfo(path);
                tiles.Add(DynamicPreprocess.CountTiles(info.Width, info.Height, options.MinTiles, options.MaxTiles, options.UseThumbnail, options.ImageSize));
            }
            catch (Exception e) when (e is VlmTuneException or IOException or UnauthorizedAccessException)
            {
                counters.AddBrokenImage();
                warn($"skipping sample {s.Id} ({s.Source}): image {path} cannot be read: {e.Message}");
                return null;
            }
        }
        var tokenized = Tokenize(s, tiles);
        if (tokenized is null) return null;
        long length = tokenized.InputIds.Length;
        return s.Images.Count > 0 ? length : -length;
    }

    private TokenizedSample? Tokenize(TrainingSample s, IReadOnlyList<int> tiles)
    {
        try
        {
            return Tokenizer.Tokenize(s.Conversations, tiles, $"sample {s.Id} ({s.Source})");
        }
        catch (ImageTokensTruncatedException e)
        {
            counters.AddTooLong();
            warn($"dropping sample {s.Id}: {e.Message}");
            return null;
        }
        catch (VlmTuneException e)
        {
            counters.AddBadRecord();
            warn($"skipping sample {s.Id}: {e.Message}");
            return null;
        }
    }

    /// <summary>Decodes and tokenises one sample; null when it has to be skipped (counted and warned).</summary>
    public EncodedSample? Encode(TrainingSample s)
    {
        var options = OptionsFor(s);
        string? cacheKey = null;
        byte[][]? files = null;
        if (VisionCache is { } cache && s.Images.Count > 0)
        {
            // Each image is read once: hashed for the key and, on a miss, decoded from the same bytes, so an entry always
            // holds the features of the bytes it is keyed by. An unreadable image gives no key; decoding it below then
            // skips the sample as usual.
            try
            {
                files = s.Images.Select(File.ReadAllBytes).ToArray();
                cacheKey = cache.KeyFor(files, options);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { files = null; }
            if (cacheKey is not null && cache.TryLoad(cacheKey, s.Images.Count) is (var cachedTiles, var features))
            {
                var hit = Tokenize(s, cachedTiles);
                if (hit is null) { features.Dispose(); return null; }
                CountMismatch(s, hit);
                return new EncodedSample(s.Id, hit.InputIds, hit.Labels, null, cachedTiles.Sum()) { CachedFeatures = features };
            }
        }
        var processor = new ImageProcessor(options);
        var processed = new List<ProcessedImage>();
        try
        {
            for (int i = 0; i < s.Images.Count; i++)
            {
                string path = s.Images[i];
                Interlocked.Increment(ref _imagesDecoded);
                try { processed.Add(files is null ? processor.Process(path) : processor.Process(files[i], path)); }
                catch (Exception e) when (e is VlmTuneException or IOException or UnauthorizedAccessException)
                {
                    counters.AddBrokenImage();
                    warn($"skipping sample {s.Id} ({s.Source}): image {path} cannot be decoded: {e.Message}");
                    return null;
                }
            }
            var tilesPerImage = processed.Select(p => p.TileCount).ToArray();
            var tokenized = Tokenize(s, tilesPerImage);
            if (tokenized is null) return null;
            CountMismatch(s, tokenized);
            Tensor? pixels = processed.Count switch
            {
                0 => null,
                1 => processed[0].PixelValues.alias(),
                _ => cat(processed.Select(p => p.PixelValues).ToList(), 0),
            };
            return new EncodedSample(s.Id, tokenized.InputIds, tokenized.Labels, pixels, processed.Sum(p => p.TileCount))
            {
                StoreAs = cacheKey is null ? null : new VisionCacheEntry(cacheKey, tilesPerImage),
            };
        }
        finally
        {
            foreach (var p in processed) p.Dispose();
        }
    }

    private void CountMismatch(TrainingSample s, TokenizedSample tokenized)
    {
        if (!tokenized.LabelsMaskedForMismatch) return;
        counters.AddLabelMismatch();
        warn($"sample {s.Id} ({s.Source}): tokenization mismatch, all labels masked (as the official code does)");
    }
}
