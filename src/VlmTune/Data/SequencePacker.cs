namespace VlmTune.Data;

/// <summary>
/// Sequence packing (<c>pack_to_max_length: true</c>): the samples of a micro-batch share rows of at most
/// <c>max_length</c> tokens instead of each being padded to the longest. Which samples make a micro-batch is unchanged
/// (<see cref="BatchPlan"/>, batch_size per rank), so the optimizer, the token-mean loss, data-parallel dealing and
/// resume are exactly those of unpacked training; only the padding goes.
/// </summary>
public static class SequencePacker
{
    /// <summary>
    /// Packs whole samples, in the given (sampler) order, into rows: next-fit (a new row starts when the next sample does
    /// not fit) with the row capacity, at most <paramref name="maxTokens"/>, that leaves the fewest token slots
    /// (rows × longest row). Filling rows up to max_length alone can pad more than not packing at all (four samples of
    /// 300 tokens into rows of 1024: 900 + 300, padded to 2 × 900); the best capacity is never worse than one sample per
    /// row, which is next-fit at the longest sample's length. Keeping the order keeps each row's image tiles in the order
    /// of its image tokens. Samples are never split: image tokens must stay with their images.
    /// </summary>
    /// <returns>Per row, the indices (into <paramref name="samples"/>) of its samples, ascending.</returns>
    /// <exception cref="VlmTuneException">A sample is longer than a row (every such sample named).</exception>
    public static List<int[]> Rows(IReadOnlyList<(string Id, int Length)> samples, int maxTokens)
    {
        var tooLong = samples.Where(s => s.Length > maxTokens).ToList();
        if (tooLong.Count > 0)
            throw new VlmTuneException(
                $"pack_to_max_length: sample{(tooLong.Count == 1 ? "" : "s")} {string.Join(", ", tooLong.Select(s => $"{s.Id} ({s.Length} tokens)"))} " +
                $"cannot fit a packed row of max_length {maxTokens} tokens, and samples are never split (image tokens stay with their images); raise max_length.");
        if (samples.Count == 0) return [];
        var lengths = samples.Select(s => s.Length).ToArray();
        int longest = lengths.Max();
        // For each row count, the smallest capacity that needs no more rows (next-fit's row count only falls as the
        // capacity grows, so a binary search finds it; every row then is at most that long and one is exactly).
        (long Slots, int Capacity) best = (long.MaxValue, maxTokens);
        for (int rows = NextFitRowCount(lengths, maxTokens); rows <= lengths.Length; rows++)
        {
            int low = longest, high = maxTokens;
            while (low < high)
            {
                int mid = low + (high - low) / 2;
                if (NextFitRowCount(lengths, mid) <= rows) high = mid; else low = mid + 1;
            }
            long slots = (long)NextFitRowCount(lengths, low) * low;
            if (slots < best.Slots) best = (slots, low);   // ties: the fewer, longer rows found first
        }
        return NextFit(lengths, best.Capacity);
    }

    private static int NextFitRowCount(int[] lengths, int capacity)
    {
        int rows = 0;
        long used = capacity;
        foreach (var length in lengths)
        {
            if (used + length > capacity) { rows++; used = 0; }
            used += length;
        }
        return rows;
    }

    private static List<int[]> NextFit(int[] lengths, int capacity)
    {
        var rows = new List<int[]>();
        var row = new List<int>();
        long used = 0;
        for (int i = 0; i < lengths.Length; i++)
        {
            if (row.Count > 0 && used + lengths[i] > capacity)
            {
                rows.Add([.. row]);
                row.Clear();
                used = 0;
            }
            row.Add(i);
            used += lengths[i];
        }
        rows.Add([.. row]);
        return rows;
    }

    /// <summary>
    /// What packing does to one epoch of this rank's micro-batches, from the measured sample lengths (no decoding): the
    /// rows per micro-batch and the share of padding in the (rows × row length) token slots, packed and unpacked.
    /// </summary>
    public static PackingEstimate Estimate(BatchPlan plan, IReadOnlyList<long> lengths, int maxTokens, int epoch = 0)
    {
        long tokens = 0, unpackedSlots = 0, packedSlots = 0, rows = 0, batches = 0;
        for (long it = epoch * plan.BatchesPerEpoch; it < (epoch + 1) * plan.BatchesPerEpoch; it++)
        {
            var (_, indices) = plan.Batch(it);
            if (indices.Length == 0) continue;
            var batch = indices.Select(i => (i.ToString(System.Globalization.CultureInfo.InvariantCulture), (int)Math.Abs(lengths[(int)i]))).ToList();
            var packed = Rows(batch, maxTokens);
            tokens += batch.Sum(s => (long)s.Item2);
            unpackedSlots += (long)batch.Count * batch.Max(s => s.Item2);
            packedSlots += (long)packed.Count * packed.Max(r => r.Sum(i => (long)batch[i].Item2));
            rows += packed.Count;
            batches++;
        }
        return new PackingEstimate(batches, rows, tokens, unpackedSlots, packedSlots);
    }
}

/// <summary>Packing over an epoch: micro-batches, packed rows, real tokens and token slots (rows × row length) with and without packing.</summary>
public sealed record PackingEstimate(long Batches, long Rows, long Tokens, long UnpackedSlots, long PackedSlots)
{
    public double RowsPerBatch => Batches == 0 ? 0 : (double)Rows / Batches;
    public double UnpackedPadding => UnpackedSlots == 0 ? 0 : 1 - (double)Tokens / UnpackedSlots;
    public double PackedPadding => PackedSlots == 0 ? 0 : 1 - (double)Tokens / PackedSlots;
}
