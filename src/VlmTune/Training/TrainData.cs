using System.Threading.Channels;
using VlmTune.Data;
using VlmTune.Models;
using VlmTune.Text;
using VlmTune.Vision;
using static TorchSharp.torch;

using VlmTune.Distributed;

namespace VlmTune.Training;

/// <summary>Counts of what the data pipeline left out or the trainer skipped; updated from worker threads.</summary>
public sealed class DataCounters
{
    private long _badRecords, _brokenImages, _tooLong, _labelMismatch, _nanSkipped;

    /// <summary>Records that are not valid samples (bad JSON, wrong fields, image paths outside the root, ...).</summary>
    public long BadRecords => Interlocked.Read(ref _badRecords);
    /// <summary>Samples skipped because an image is missing or cannot be decoded.</summary>
    public long BrokenImages => Interlocked.Read(ref _brokenImages);
    /// <summary>Samples dropped because the maximum length would cut their image tokens.</summary>
    public long TooLong => Interlocked.Read(ref _tooLong);
    /// <summary>Samples whose labels the official tokenisation masks entirely ("tokenization mismatch").</summary>
    public long LabelMismatch => Interlocked.Read(ref _labelMismatch);
    /// <summary>Micro-batches or optimizer steps skipped for a non-finite loss or gradient norm (nan_policy: skip).</summary>
    public long NanSkipped => Interlocked.Read(ref _nanSkipped);

    internal void AddBadRecord() => Interlocked.Increment(ref _badRecords);
    internal void AddBrokenImage() => Interlocked.Increment(ref _brokenImages);
    internal void AddTooLong() => Interlocked.Increment(ref _tooLong);
    internal void AddLabelMismatch() => Interlocked.Increment(ref _labelMismatch);
    internal void AddNanSkipped() => Interlocked.Increment(ref _nanSkipped);

    internal void Restore(long bad, long broken, long tooLong, long mismatch, long nan)
    {
        _badRecords = bad; _brokenImages = broken; _tooLong = tooLong; _labelMismatch = mismatch; _nanSkipped = nan;
    }

    public override string ToString() =>
        $"bad records: {BadRecords}, broken images: {BrokenImages}, too long: {TooLong}, label mismatch: {LabelMismatch}, non-finite skipped: {NanSkipped}";
}

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

    private ImageProcessorOptions OptionsFor(TrainingSample s) =>
        s.MaxDynamicPatch is { } max ? images with { MaxTiles = max } : images;

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

/// <summary>The samples of a run, with their lengths for length-grouped batching.</summary>
public sealed class TrainDataset
{
    public required IReadOnlyList<TrainingSample> Samples { get; init; }
    /// <summary>Signed token lengths (negative: text-only), one per sample.</summary>
    public required long[] Lengths { get; init; }

    /// <summary>
    /// Reads every data file, keeping the samples that can be trained on (others counted and warned about). Samples are
    /// measured (image headers, tokenisation) on <paramref name="threads"/> threads; their order is kept.
    /// </summary>
    public static TrainDataset Build(IReadOnlyList<string> dataFiles, string? imageRoot, SampleEncoder encoder, DataCounters counters, Action<string> warn, int threads = 1)
    {
        var samples = new List<TrainingSample>();
        var lengths = new List<long>();
        var entries = dataFiles.SelectMany(file => TrainingData.ReadEntries(file, imageRoot));
        var measured = entries.AsParallel().AsOrdered().WithDegreeOfParallelism(Math.Max(1, threads)).Select(entry =>
        {
            if (entry.Problem is { } problem)
            {
                if (problem.Kind is DataProblemKind.ImageMissing or DataProblemKind.ImageUndecodable) counters.AddBrokenImage();
                else counters.AddBadRecord();
                warn($"skipping {problem}");
                return ((TrainingSample?)null, (long?)null);
            }
            return (entry.Sample, encoder.MeasureLength(entry.Sample!));
        });
        try
        {
            foreach (var (sample, length) in measured)
            {
                if (sample is null || length is null) continue;
                samples.Add(sample);
                lengths.Add(length.Value);
            }
        }
        catch (AggregateException e) when (e.InnerExceptions.Count == 1)
        {
            // A data file that cannot be read at all (not found, not JSON lines/array/meta): report it as itself.
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(e.InnerExceptions[0]).Throw();
        }
        return new TrainDataset { Samples = samples, Lengths = lengths.ToArray() };
    }
}

/// <summary>
/// A padded micro-batch: (B, T) ids and labels (right-padded), the tiles of all its images, and where they came from.
/// Packed (<see cref="Packing"/> set), B counts rows, each holding whole samples back to back.
/// </summary>
public sealed class TrainBatch : IDisposable
{
    public required long Iteration { get; init; }
    public required Tensor InputIds { get; init; }
    public required Tensor Labels { get; init; }
    /// <summary>Where the samples lie in packed rows; null for one sample per row.</summary>
    public PackedRows? Packing { get; init; }
    /// <summary>Tiles for the vision tower: every image's, or with the vision cache only those of samples it did not have.</summary>
    public Tensor? Pixels { get; init; }
    /// <summary>Cached pixel-shuffled ViT features (tiles, 256, 4C) of the samples the vision cache had, in batch order.</summary>
    public Tensor? CachedFeatures { get; init; }
    /// <summary>Per sample with images, in batch order: where its features come from (<see cref="VisionSource"/>).</summary>
    public IReadOnlyList<VisionSource> Vision { get; init; } = [];
    public required string[] SampleIds { get; init; }
    /// <summary>Tokens that are not padding.</summary>
    public required long Tokens { get; init; }
    public required int Tiles { get; init; }
    /// <summary>Samples of this batch's slot that were skipped (broken image, too long).</summary>
    public required int Skipped { get; init; }

    public bool IsEmpty => SampleIds.Length == 0;

    /// <param name="packTokens">
    /// null: one sample per row. Otherwise the samples are packed, in order, into as few rows of at most this many tokens
    /// as next-fit gives (see <see cref="SequencePacker"/>).
    /// </param>
    public static TrainBatch Collate(long iteration, IReadOnlyList<EncodedSample> samples, int skipped, int padId, int? packTokens = null)
    {
        bool packed = packTokens is not null && samples.Count > 0;
        var rows = packed
            ? SequencePacker.Rows(samples.Select(s => (s.Id, s.InputIds.Length)).ToList(), packTokens!.Value)
            : samples.Select((_, i) => new[] { i }).ToList();
        int t = rows.Count == 0 ? 1 : rows.Max(r => r.Sum(i => samples[i].InputIds.Length));
        var ids = new long[rows.Count * t];
        var labels = new long[rows.Count * t];
        Array.Fill(ids, padId);
        Array.Fill(labels, CausalLmLoss.IgnoreIndex);
        for (int r = 0; r < rows.Count; r++)
        {
            int at = r * t;
            foreach (var i in rows[r])
            {
                var sample = samples[i];
                for (int j = 0; j < sample.InputIds.Length; j++)
                {
                    ids[at + j] = sample.InputIds[j];
                    labels[at + j] = sample.Labels[j];
                }
                // The loss compares position p's logits with label p + 1: a packed sample's first label would be the
                // target of the previous sample's last token. Unpacked, nothing predicts a first token, so packed neither.
                if (packed) labels[at] = CausalLmLoss.IgnoreIndex;
                at += sample.InputIds.Length;
            }
        }
        // Rows hold the samples in their order, so the <IMG_CONTEXT> tokens (read row by row) meet the tiles in the
        // order they are concatenated.
        var (pixels, cached, vision) = CollateImages(samples);
        return new TrainBatch
        {
            Iteration = iteration,
            InputIds = tensor(ids, [rows.Count, t]),
            Labels = tensor(labels, [rows.Count, t]),
            Packing = packed ? new PackedRows(rows.Select(r => r.Select(i => samples[i].InputIds.Length).ToArray()).ToList(), t) : null,
            Pixels = pixels,
            CachedFeatures = cached,
            Vision = vision,
            SampleIds = samples.Select(s => s.Id).ToArray(),
            Tokens = samples.Sum(s => (long)s.InputIds.Length),
            Tiles = samples.Sum(s => s.Tiles),
            Skipped = skipped,
        };
    }

    /// <summary>
    /// The images' part of a batch, in sample order: the tiles for the vision tower, the vision cache's features, and
    /// per sample with images which of the two holds its features.
    /// </summary>
    private static (Tensor? Pixels, Tensor? CachedFeatures, VisionSource[] Vision) CollateImages(IReadOnlyList<EncodedSample> samples)
    {
        var pixels = samples.Where(s => s.Pixels is not null).Select(s => s.Pixels!).ToList();
        var cached = samples.Where(s => s.CachedFeatures is not null).Select(s => s.CachedFeatures!).ToList();
        return (pixels.Count == 0 ? null : cat(pixels, 0), cached.Count == 0 ? null : cat(cached, 0),
            samples.Where(s => s.Tiles > 0).Select(s => new VisionSource(s.Tiles, s.CachedFeatures is not null, s.StoreAs)).ToArray());
    }

    public void Dispose()
    {
        InputIds.Dispose(); Labels.Dispose(); Pixels?.Dispose(); CachedFeatures?.Dispose();
    }
}

/// <summary>
/// Where one sample's image features come from: the next <paramref name="Tiles"/> rows of the batch's cached features,
/// or of the vision tower's output over its pixels (then stored in the cache under <paramref name="StoreAs"/>, if set).
/// </summary>
public sealed record VisionSource(int Tiles, bool Cached, VisionCacheEntry? StoreAs);

/// <summary>
/// Which samples make each iteration's micro-batch: per epoch a length-grouped (or plain) seeded order, cut into
/// batches of batch_size (the last one smaller). Deterministic from the seed, so a resumed run sees the same batches.
/// </summary>
public sealed class BatchPlan
{
    private readonly TrainDataset _dataset;
    private readonly int _batchSize, _rank, _worldSize;
    private readonly long _seed;
    private readonly bool _groupByLength;
    private int _cachedEpoch = -1;
    private long[] _order = [];

    /// <param name="batchSize">Samples per rank per micro-batch (config batch_size).</param>
    /// <param name="rank">This data-parallel rank; the global batch is batchSize × worldSize.</param>
    public BatchPlan(TrainDataset dataset, int batchSize, long seed, bool groupByLength, int rank = 0, int worldSize = 1)
    {
        _dataset = dataset; _batchSize = batchSize; _seed = seed; _groupByLength = groupByLength; _rank = rank; _worldSize = worldSize;
        BatchesPerEpoch = DistributedSampler.StepCount(dataset.Samples.Count, worldSize, batchSize);
    }

    public long BatchesPerEpoch { get; }

    /// <summary>This rank's samples of micro-batch <paramref name="iteration"/> (possibly fewer than batch_size, or none, at an epoch's end).</summary>
    public (int Epoch, long[] Samples) Batch(long iteration)
    {
        int epoch = (int)(iteration / BatchesPerEpoch);
        long inEpoch = iteration % BatchesPerEpoch;
        lock (this)
        {
            if (epoch != _cachedEpoch)
            {
                // Every rank computes the same global order; mega-batches are sized for the global batch, as XTuner's
                // sampler sizes them, so N ranks × B see exactly what one process with N·B sees.
                _order = _groupByLength
                    ? LengthGroupedSampler.Order(_dataset.Lengths, _batchSize * _worldSize, _seed, epoch)
                    : LengthGroupedSampler.Shuffled(_dataset.Samples.Count, _seed, epoch);
                _cachedEpoch = epoch;
            }
            return (epoch, DistributedSampler.RankBatch(_order, inEpoch, _rank, _worldSize, _batchSize));
        }
    }
}

/// <summary>
/// Builds micro-batches ahead of the trainer on <c>dataloader_num_workers</c> background workers (image decoding and
/// tiling, tokenisation, collation) and hands them over in iteration order through a bounded queue.
/// </summary>
public sealed class BatchLoader : IDisposable
{
    private readonly Func<long, TrainBatch> _build;
    private readonly Channel<Task<TrainBatch>>? _queue;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task? _producer;
    private long _next;

    /// <param name="packTokens">Pack each micro-batch's samples into rows of at most this many tokens; null: one sample per row.</param>
    public BatchLoader(TrainDataset dataset, BatchPlan plan, SampleEncoder encoder, int padId, long firstIteration, long endIteration, int workers, int? packTokens = null)
    {
        _next = firstIteration;
        _build = iteration =>
        {
            var (_, indices) = plan.Batch(iteration);
            var encoded = new List<EncodedSample>();
            int skipped = 0;
            try
            {
                foreach (var i in indices)
                {
                    if (encoder.Encode(dataset.Samples[(int)i]) is { } e) encoded.Add(e);
                    else skipped++;
                }
                return TrainBatch.Collate(iteration, encoded, skipped, padId, packTokens);
            }
            finally
            {
                foreach (var e in encoded) e.Dispose();
            }
        };
        if (workers <= 0) return;

        _queue = Channel.CreateBounded<Task<TrainBatch>>(new BoundedChannelOptions(Math.Max(2, workers * 2)) { SingleReader = true, SingleWriter = true });
        var slots = new SemaphoreSlim(workers);
        var token = _stop.Token;
        _producer = Task.Run(async () =>
        {
            try
            {
                for (long it = firstIteration; it < endIteration; it++)
                {
                    await slots.WaitAsync(token);
                    long current = it;
                    var job = Task.Run(() =>
                    {
                        try { return _build(current); }
                        finally { slots.Release(); }
                    });
                    await _queue.Writer.WriteAsync(job, token);
                }
                _queue.Writer.TryComplete();
            }
            catch (OperationCanceledException) { _queue.Writer.TryComplete(); }
            catch (Exception e) { _queue.Writer.TryComplete(e); }
        });
    }

    /// <summary>The next iteration's batch (blocks until a worker has it ready).</summary>
    public TrainBatch Next()
    {
        if (_queue is null) return _build(_next++);
        var job = _queue.Reader.ReadAsync().AsTask().GetAwaiter().GetResult();
        var batch = job.GetAwaiter().GetResult();
        _next++;
        return batch;
    }

    public void Dispose()
    {
        _stop.Cancel();
        if (_queue is null) return;
        try { _producer?.Wait(TimeSpan.FromSeconds(30)); } catch (AggregateException) { }
        while (_queue.Reader.TryRead(out var job))
        {
            try { job.GetAwaiter().GetResult().Dispose(); } catch (Exception) { }
        }
    }
}
