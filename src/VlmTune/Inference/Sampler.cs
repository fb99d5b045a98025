using static TorchSharp.torch;

namespace VlmTune.Inference;

/// <summary>
/// Picks next tokens from last-position logits, for one request (its options and random stream) or for a whole batch
/// of them at once (<see cref="Sample"/>): the engine's decode step samples every row with one set of tensor ops and
/// one download, whatever each row asks for, instead of a few syncs and a (1, V) download per sampled row.
/// HF's order: repetition penalty, temperature, top-k, top-p; then a draw by inverse CDF: one uniform per row from the
/// request's seeded generator on the CPU (TorchSharp's MT19937, CPU-only; a seeded System.Random's first draws step
/// almost linearly with consecutive seeds), so a seed gives the same uniforms on every device and in every batch, and
/// the device only needs the row's cumulative sum.
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
        var scores = logits.to_type(ScalarType.Float32);                                             // (B, V)
        long vocab = scores.shape[^1];
        bool penalised = seen is not null && rows.Any(r => r.Options.RepetitionPenalty != 1.0);
        bool anySampled = rows.Any(r => !r.Options.Greedy);
        // Every row's parameters in one upload (a copy from pageable host memory waits for the device): (B, 6) columns
        // penalty, temperature, top-k index, 1 − top_p, uniform, greedy. Greedy rows: temperature 1, keep everything.
        Tensor? parameters = null;
        if (penalised || anySampled)
        {
            var table = new float[b * Columns];
            for (int i = 0; i < b; i++)
            {
                var o = rows[i].Options;
                bool sampled = !o.Greedy;
                table[i * Columns + Penalty] = (float)o.RepetitionPenalty;
                table[i * Columns + Temperature] = sampled ? (float)o.Temperature : 1f;
                // The k-th best score (k = V where top-k is off: the lowest, masking nothing); ids < 2^24 are exact floats.
                table[i * Columns + TopKIndex] = (sampled && o.TopK > 0 && o.TopK < vocab ? o.TopK : vocab) - 1;
                table[i * Columns + TopPTail] = sampled ? (float)(1 - o.TopP) : 0f;
                table[i * Columns + Uniform] = rows[i].NextUniform();
                table[i * Columns + Greedy] = sampled ? 0f : 1f;
            }
            parameters = tensor(table, [b, Columns], device: logits.device);
        }
        Tensor Column(int c) => parameters!.narrow(1, c, 1);                                          // (B, 1)

        if (penalised)
        {
            // HF RepetitionPenaltyLogitsProcessor: divide positive scores, multiply negative ones, for every seen id.
            var penalty = Column(Penalty);
            var picked = scores.gather(1, seen!);
            scores = scores.scatter(1, seen!, where(picked < 0, picked * penalty, picked / penalty));
        }
        var (best, greedyIds) = scores.max(-1);                                                       // (B)
        var finite = best.isfinite();
        Tensor ids = greedyIds;
        if (anySampled)
        {
            scores = scores / Column(Temperature);
            finite = finite.logical_and(scores.max(-1).values.isfinite());
            if (rows.Any(r => !r.Options.Greedy && r.Options.TopK > 0 && r.Options.TopK < vocab))
            {
                var kth = scores.sort(-1, descending: true).Values.gather(1, Column(TopKIndex).to_type(ScalarType.Int64));   // (B, 1)
                scores = scores.masked_fill(scores < kth, Models.Init.NegativeInfinity);
            }
            if (rows.Any(r => !r.Options.Greedy && r.Options.TopP < 1.0))
            {
                // HF TopPLogitsWarper: sort ascending, drop the low tail whose cumulative mass is ≤ 1 - top_p, keep at
                // least one. top_p 1: a tail of mass ≤ 0, which holds only tokens already at −inf.
                var (sorted, order) = scores.sort(-1, descending: false);
                var drop = sorted.softmax(-1).cumsum(-1) <= Column(TopPTail);
                drop.select(1, -1).fill_(false);
                scores = scores.masked_fill(drop.scatter(1, order, drop), Models.Init.NegativeInfinity);
            }
            // Inverse CDF: the first id whose cumulative probability exceeds u·total (zero-probability ids never do).
            var cdf = scores.softmax(-1).cumsum(-1);                                                  // (B, V)
            var drawn = searchsorted(cdf, Column(Uniform) * cdf[.., ^1..], right: true).clamp_max(vocab - 1).view(b);
            ids = where(Column(Greedy).view(b) > 0.5f, greedyIds, drawn);
        }
        var result = stack([ids, finite.to_type(ScalarType.Int64)]).cpu().data<long>().ToArray();   // the one download
        return new SampledRows(result[..b], result[b..].Select(f => f != 0).ToArray());
    }

    private const int Columns = 6, Penalty = 0, Temperature = 1, TopKIndex = 2, TopPTail = 3, Uniform = 4, Greedy = 5;

    /// <summary>A uniform in [0, 1) from this request's stream; 0 for greedy requests, which draw nothing.</summary>
    private float NextUniform()
    {
        if (_generator is null) return 0f;
        using var u = rand(1, generator: _generator);
        return u.item<float>();
    }

    public void Dispose() => _generator?.Dispose();
}

/// <summary>Each row's next id and whether its scores had a finite maximum (if not, the id means nothing).</summary>
public sealed record SampledRows(long[] Ids, bool[] Finite);

/// <summary>The model gave NaN or infinite scores for a sequence (e.g. broken weights): that sequence cannot go on.</summary>
public sealed class NonFiniteScoresException() : VlmTuneException("The model produced non-finite scores (NaN or inf) for this sequence; its weights or inputs are broken.");
