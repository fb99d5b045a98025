using static TorchSharp.torch;

namespace VlmTune.Inference;

/// <summary>
/// Picks next tokens from last-position logits, for one request (its options and random stream) or for a whole batch
/// of them at once (<see cref="Sample"/>): the engine's decode step samples every row with one set of tensor ops and
/// one download, whatever each row asks for, instead of a few syncs and a (1, V) download per sampled row.
/// HF's order: repetition penalty, temperature, top-k, top-p; then a draw by inverse CDF: one uniform per row from the
/// request's seeded generator on the CPU (TorchSharp's generators are CPU-only; MT19937, where seeded
/// System.Random gives nearly linear first draws for consecutive seeds), so a seed gives the same uniforms on every
/// device and in every batch, and the device only needs the row's cumulative sum.
/// </summary>
public sealed class Sampler : IDisposable
{
    private readonly Generator? _generator;

    public Sampler(SamplingOptions options)
    {
        Options = options;
        if (!options.Greedy)
        {
            _generator = new Generator((ulong)(options.Seed ?? Random.Shared.NextInt64()), CPU);
        }
    }

    public SamplingOptions Options { get; }

    /// <summary>
    /// logits: (B, V) → (B) next ids, every row sampled with these options; <paramref name="seen"/> (B, S) holds prompt
    /// + generated ids for the repetition penalty. Throws <see cref="NonFiniteScoresException"/> if a row has none.
    /// </summary>
    public Tensor Next(Tensor logits, Tensor? seen)
    {
        var rows = Enumerable.Repeat(this, (int)logits.shape[0]).ToList();
        var sampled = Sample(rows, logits, seen);
        if (sampled.Finite.Any(f => !f)) throw new NonFiniteScoresException();
        return tensor(sampled.Ids, device: logits.device);
    }

    /// <summary>
    /// The next id of each row of <paramref name="logits"/> (B, V), row i sampled with <paramref name="rows"/>[i]'s
    /// options; <paramref name="seen"/> (B, L) the ids each row's repetition penalty applies to (rows without one are
    /// not changed by theirs; pad a row by repeating one of its ids), null when no row has one. A row whose scores
    /// have no finite maximum (NaN, +inf, or all −inf) is marked not finite, its id meaningless: the others are not
    /// affected, every operation being row by row. One host synchronisation, the download of the result.
    /// </summary>
    public static SampledRows Sample(IReadOnlyList<Sampler> rows, Tensor logits, Tensor? seen)
    {
        using var scope = NewDisposeScope();
        int b = rows.Count;
        var device = logits.device;
        var scores = logits.to_type(ScalarType.Float32);                                             // (B, V)
        if (seen is not null && rows.Any(r => r.Options.RepetitionPenalty != 1.0))
        {
            // HF RepetitionPenaltyLogitsProcessor: divide positive scores, multiply negative ones, for every seen id.
            var penalty = Column(rows.Select(r => (float)r.Options.RepetitionPenalty), device);       // (B, 1)
            var picked = scores.gather(1, seen);
            var penalised = where(picked < 0, picked * penalty, picked / penalty);
            scores = scores.scatter(1, seen, penalised);
        }
        var (best, greedyIds) = scores.max(-1);                                                       // (B)
        var finite = best.isfinite();
        bool anySampled = rows.Any(r => !r.Options.Greedy);
        Tensor ids = greedyIds;
        if (anySampled)
        {
            // Greedy rows take the argmax above; dividing them by 1 keeps their (unused) scores finite.
            scores = scores / Column(rows.Select(r => r.Options.Greedy ? 1f : (float)r.Options.Temperature), device);
            finite = finite.logical_and(scores.max(-1).values.isfinite());
            long vocab = scores.shape[^1];
            if (rows.Any(r => !r.Options.Greedy && r.Options.TopK > 0 && r.Options.TopK < vocab))
            {
                // The k-th best score of each row (k = V where top-k is off: its lowest, masking nothing).
                var k = tensor(rows.Select(r => (long)(r.Options.TopK > 0 && r.Options.TopK < vocab ? r.Options.TopK : vocab) - 1).ToArray(), device: device).view(b, 1);
                var kth = scores.sort(-1, descending: true).Values.gather(1, k);                       // (B, 1)
                scores = scores.masked_fill(scores < kth, Models.Init.NegativeInfinity);
            }
            if (rows.Any(r => !r.Options.Greedy && r.Options.TopP < 1.0))
            {
                // HF TopPLogitsWarper: sort ascending, drop the low tail whose cumulative mass is ≤ 1 - top_p, keep at
                // least one. top_p 1: a tail of mass ≤ 0, which holds only tokens already at −inf.
                var (sorted, order) = scores.sort(-1, descending: false);
                var cumulative = sorted.softmax(-1).cumsum(-1);
                var drop = cumulative <= Column(rows.Select(r => r.Options.Greedy ? 0f : (float)(1 - r.Options.TopP)), device);
                drop[.., ^1] = tensor(false);
                scores = scores.masked_fill(drop.scatter(1, order, drop), Models.Init.NegativeInfinity);
            }
            // Inverse CDF: the first id whose cumulative probability exceeds u·total (zero-probability ids never do).
            var cdf = scores.softmax(-1).cumsum(-1);                                                  // (B, V)
            var u = Column(rows.Select(r => r.NextUniform()), device);
            var drawn = searchsorted(cdf, u * cdf[.., ^1..], right: true).clamp_max(vocab - 1).view(b);
            var greedy = tensor(rows.Select(r => r.Options.Greedy).ToArray(), device: device);
            ids = where(greedy, greedyIds, drawn);
        }
        var result = stack([ids, finite.to_type(ScalarType.Int64)]).cpu().data<long>().ToArray();   // the one download
        return new SampledRows(result[..b], result[b..].Select(f => f != 0).ToArray());
    }

    /// <summary>A uniform in [0, 1) from this request's stream; 0 for greedy requests, which draw nothing.</summary>
    private float NextUniform()
    {
        if (_generator is null) return 0f;
        using var u = rand(1, generator: _generator);
        return u.item<float>();
    }

    private static Tensor Column(IEnumerable<float> values, Device device)
    {
        var array = values.ToArray();
        return tensor(array, device: device).view(array.Length, 1);
    }

    public void Dispose() => _generator?.Dispose();
}

/// <summary>Each row's next id and whether its scores had a finite maximum (if not, the id means nothing).</summary>
public sealed record SampledRows(long[] Ids, bool[] Finite);

/// <summary>The model gave NaN or infinite scores for a sequence (e.g. broken weights): that sequence cannot go on.</summary>
public sealed class NonFiniteScoresException() : VlmTuneException("The model produced non-finite scores (NaN or inf) for this sequence; its weights or inputs are broken.");
