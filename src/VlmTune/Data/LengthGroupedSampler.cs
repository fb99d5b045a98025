using static TorchSharp.torch;

namespace VlmTune.Data;

/// <summary>
/// XTuner's LengthGroupedSampler (single process): each epoch, a seeded random permutation is cut into mega-batches of
/// <c>mega_batch_mult × batch_size</c> samples, each sorted by length, longest first, so batches hold samples of similar
/// length (less padding). Lengths are positive for samples with images and negative for text-only ones: the two
/// modalities are grouped separately and never share a mega-batch except the last. The longest mega-batch's head is
/// swapped to the front so an out-of-memory shows at the first step. Permutations use torch's generator seeded with
/// seed + epoch, as XTuner does, so the order matches PyTorch's.
/// </summary>
public static class LengthGroupedSampler
{
    public static int GroupBatchSize(int datasetSize, int batchSize)
    {
        int mult = Math.Min(datasetSize / (batchSize * 4), 50);
        return Math.Max(mult, 1) * batchSize;
    }

    /// <summary>The sample order of one epoch.</summary>
    public static long[] Order(IReadOnlyList<long> lengths, int batchSize, long seed, int epoch)
    {
        if (lengths.Any(l => l == 0)) throw new ArgumentException("lengths must not be zero.");
        using var generator = new Generator((ulong)(seed + epoch));
        int group = GroupBatchSize(lengths.Count, batchSize);
        List<List<long>> megabatches;
        bool allSame = lengths.All(l => l > 0) || lengths.All(l => l < 0);
        if (allSame)
            megabatches = Process(lengths.Select(Math.Abs).ToList(), group, generator);
        else
        {
            var mm = Enumerable.Range(0, lengths.Count).Where(i => lengths[i] > 0).Select(i => (long)i).ToList();
            var lang = Enumerable.Range(0, lengths.Count).Where(i => lengths[i] < 0).Select(i => (long)i).ToList();
            var mmBatches = Process(mm.Select(i => lengths[(int)i]).ToList(), group, generator).Select(b => b.Select(i => mm[(int)i]).ToList()).ToList();
            var langBatches = Process(lang.Select(i => -lengths[(int)i]).ToList(), group, generator).Select(b => b.Select(i => lang[(int)i]).ToList()).ToList();
            var last = mmBatches[^1].Concat(langBatches[^1]).ToList();
            var rest = mmBatches[..^1].Concat(langBatches[..^1]).ToList();
            var perm = Permutation(rest.Count, generator);
            megabatches = perm.Select(i => rest[(int)i]).ToList();
            if (last.Count > 0) megabatches.Add(last.OrderByDescending(i => Math.Abs(lengths[(int)i])).ToList());
        }
        // Longest first: swap the head of the mega-batch holding the longest sample with the first mega-batch's head.
        int maxIdx = 0;
        for (int i = 1; i < megabatches.Count; i++)
            if (Math.Abs(lengths[(int)megabatches[i][0]]) > Math.Abs(lengths[(int)megabatches[maxIdx][0]])) maxIdx = i;
        (megabatches[0][0], megabatches[maxIdx][0]) = (megabatches[maxIdx][0], megabatches[0][0]);
        return megabatches.SelectMany(b => b).ToArray();
    }

    /// <summary>A seeded random order without grouping (group_by_length: false).</summary>
    public static long[] Shuffled(int count, long seed, int epoch)
    {
        using var generator = new Generator((ulong)(seed + epoch));
        return Permutation(count, generator);
    }

    private static List<List<long>> Process(List<long> lengths, int group, Generator generator)
    {
        var indices = Permutation(lengths.Count, generator);
        var result = new List<List<long>>();
        for (int i = 0; i < indices.Length; i += group)
            // A stable sort, as Python's sorted(..., reverse=True) keeps equal lengths in permutation order.
            result.Add(indices.Skip(i).Take(group).Select((idx, k) => (idx, k)).OrderByDescending(p => lengths[(int)p.idx]).ThenBy(p => p.k).Select(p => p.idx).ToList());
        return result;
    }

    private static long[] Permutation(int n, Generator generator)
    {
        using var perm = randperm(n, generator: generator);
        return perm.data<long>().ToArray();
    }
}
