using VlmTune.Models;
using VlmTune.Text;
using static TorchSharp.torch;

namespace VlmTune.Data;

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
    /// <summary>
    /// Unpacked rows: the longest sample's length, which decides the dynamic-NTK RoPE base though the rows may be padded
    /// past it (pad_to_multiple_of; <see cref="DecoderInputs.RopeLength"/>). Null: packed rows (their
    /// <see cref="PackedRows"/> carries it) or no sample.
    /// </summary>
    public long? RopeLength { get; init; }
    public required int Tiles { get; init; }
    /// <summary>Samples of this batch's slot that were skipped (broken image, too long).</summary>
    public required int Skipped { get; init; }

    public bool IsEmpty => SampleIds.Length == 0;

    /// <param name="packTokens">
    /// null: one sample per row. Otherwise the samples are packed, in order, into as few rows of at most this many tokens
    /// as next-fit gives (see <see cref="SequencePacker"/>).
    /// </param>
    /// <param name="padMultiple">Row length rounded up to a multiple of this (TrainConfig.pad_to_multiple_of).</param>
    public static TrainBatch Collate(long iteration, IReadOnlyList<EncodedSample> samples, int skipped, int padId, int? packTokens = null, int padMultiple = 1)
    {
        bool packed = packTokens is not null && samples.Count > 0;
        var rows = packed
            ? SequencePacker.Rows(samples.Select(s => (s.Id, s.InputIds.Length)).ToList(), packTokens!.Value)
            : samples.Select((_, i) => new[] { i }).ToList();
        int t = rows.Count == 0 ? 1 : rows.Max(r => r.Sum(i => samples[i].InputIds.Length));
        t = (t + padMultiple - 1) / padMultiple * padMultiple;
        var ids = new long[rows.Count * t];
        var labels = new long[rows.Count * t];
        Array.Fill(ids, padId);
        Array.Fill(labels, ConversationTokenizer.IgnoreTokenId);
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
                if (packed) labels[at] = ConversationTokenizer.IgnoreTokenId;
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
            RopeLength = packed || samples.Count == 0 ? null : samples.Max(s => s.InputIds.Length),
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
        InputIds.Dispose(); Labels.Dispose(); Pixels?.Dispose(); CachedFeatures?.Dispose(); Packing?.Dispose();
    }
}

/// <summary>
/// Where one sample's image features come from: the next <paramref name="Tiles"/> rows of the batch's cached features,
/// or of the vision tower's output over its pixels (then stored in the cache under <paramref name="StoreAs"/>, if set).
/// </summary>
public sealed record VisionSource(int Tiles, bool Cached, VisionCacheEntry? StoreAs);
