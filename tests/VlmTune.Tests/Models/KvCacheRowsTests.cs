using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Tests.Models;

/// <summary>
/// Rows joining and leaving a batch cache in place (spare rows of its storage) hold what rebuilding it with
/// <see cref="KvCache.Stack"/> would: the same entries, right-aligned, and the same positions, in every valid column.
/// </summary>
public sealed class KvCacheRowsTests
{
    private static readonly LlmConfig Config = new()
    {
        Architecture = LlmArchitectures.Llama, HiddenSize = 16, NumHiddenLayers = 2, NumAttentionHeads = 2, NumKeyValueHeads = 1,
        IntermediateSize = 32, VocabSize = 32, MaxPositionEmbeddings = 64, RopeTheta = 10000,
    };

    /// <summary>A one-row cache of <paramref name="length"/> random entries at positions 0..length−1.</summary>
    private static KvCache Row(long length, int seed)
    {
        var cache = new KvCache(Config, 1, length, ScalarType.Float32, CPU);
        using var scope = NewDisposeScope();
        manual_seed(seed);
        for (int layer = 0; layer < Config.NumHiddenLayers; layer++)
            cache.Append(layer, randn(1, 1, length, Config.HeadDim), randn(1, 1, length, Config.HeadDim));
        cache.Advance(arange(length).unsqueeze(0), Config.RopeTheta);
        return cache;
    }

    /// <summary>Row r's newest <paramref name="length"/> entries of every layer, keys then values, and their positions.</summary>
    private static Tensor Entries(KvCache cache, long row, long length) =>
        cat([.. Enumerable.Range(0, Config.NumHiddenLayers).SelectMany(l => new[] { cache.KeysOf(l), cache.ValuesOf(l) })
            .Select(t => t[row].narrow(1, cache.Length - length, length).reshape(-1)),
            cache.PositionsTensor[row].narrow(0, cache.Length - length, length).to_type(ScalarType.Float32)]);

    [Fact]
    public void RowsJoinAndLeaveInPlaceAsARebuildWouldPlaceThem()
    {
        using var scope = NewDisposeScope();
        using KvCache a = Row(12, 1), b = Row(7, 2), c = Row(9, 3), d = Row(12, 4);
        using var batch = KvCache.Stack([new KvRow(a, 0, 12), new KvRow(b, 0, 7)], capacity: 20, rowCapacity: 4);
        Assert.Equal((2L, 4L), (batch.Batch, batch.RowCapacity));

        Assert.True(batch.TryAppendRows([new KvRow(c, 0, 9), new KvRow(d, 0, 5, End: 5)]));   // d: its first 5 entries
        using var rebuilt = KvCache.Stack([new KvRow(a, 0, 12), new KvRow(b, 0, 7), new KvRow(c, 0, 9), new KvRow(d, 0, 5, End: 5)], capacity: 20);
        Assert.Equal(4, batch.Batch);
        foreach (var (row, length) in new (long, long)[] { (0, 12), (1, 7), (2, 9), (3, 5) })
            Assert.True(Entries(batch, row, length).equal(Entries(rebuilt, row, length)).all().item<bool>(), $"row {row}");

        // Full now: no spare row, nothing changes.
        Assert.False(batch.TryAppendRows([new KvRow(b, 0, 7)]));
        Assert.Equal(4, batch.Batch);

        // Row 1 leaves: the last row (d's) takes its place.
        batch.RemoveRow(1);
        Assert.Equal(3, batch.Batch);
        Assert.True(Entries(batch, 1, 5).equal(Entries(rebuilt, 3, 5)).all().item<bool>());
        Assert.True(Entries(batch, 0, 12).equal(Entries(rebuilt, 0, 12)).all().item<bool>());
        Assert.True(Entries(batch, 2, 9).equal(Entries(rebuilt, 2, 9)).all().item<bool>());

        // A row longer than the batch's entries cannot join in place (it would need the whole batch shifted).
        using var longer = Row(13, 5);
        Assert.False(batch.TryAppendRows([new KvRow(longer, 0, 13)]));
        Assert.Equal(3, batch.Batch);
    }
}
