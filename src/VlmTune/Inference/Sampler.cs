using static TorchSharp.torch;

namespace VlmTune.Inference;

/// <summary>
/// Picks next tokens from last-position logits. Sampling draws on the CPU with a seeded generator (TorchSharp's
/// generators are CPU-only), which also makes a seed give the same tokens on every device.
/// </summary>
public sealed class Sampler : IDisposable
{
    private readonly SamplingOptions _options;
    private readonly Generator? _generator;

    public Sampler(SamplingOptions options, Device device)
    {
        _options = options;
        if (!options.Greedy)
        {
            _generator = new Generator((ulong)(options.Seed ?? Random.Shared.NextInt64()), CPU);
        }
    }

    /// <summary>logits: (B, V) → (B) next ids; <paramref name="seen"/> (B, S) holds prompt + generated ids for the repetition penalty.</summary>
    public Tensor Next(Tensor logits, Tensor? seen)
    {
        using var scope = NewDisposeScope();
        var scores = logits.to_type(ScalarType.Float32);
        if (_options.RepetitionPenalty != 1.0 && seen is not null)
        {
            // HF RepetitionPenaltyLogitsProcessor: divide positive scores, multiply negative ones, for every seen id.
            var picked = scores.gather(1, seen);
            var penalised = where(picked < 0, picked * _options.RepetitionPenalty, picked / _options.RepetitionPenalty);
            scores = scores.scatter(1, seen, penalised);
        }
        if (_options.Greedy) return FiniteMax(scores).MoveToOuterDisposeScope();

        scores = scores / _options.Temperature;
        // Finite maxima keep every step below finite: masking only adds -inf, and softmax of a finite maximum is defined.
        FiniteMax(scores);
        if (_options.TopK > 0 && _options.TopK < scores.shape[^1])
        {
            var kth = scores.topk(_options.TopK, -1).values[.., ^1..];                 // (B, 1)
            scores = scores.masked_fill(scores < kth, VlmTune.Models.Init.NegativeInfinity);
        }
        if (_options.TopP < 1.0)
        {
            // HF TopPLogitsWarper: sort ascending, drop the low tail whose cumulative mass is ≤ 1 - top_p, keep at least one.
            var (sorted, order) = scores.sort(-1, descending: false);
            var cumulative = sorted.softmax(-1).cumsum(-1);
            var drop = cumulative <= (1 - _options.TopP);
            drop[.., ^1] = tensor(false);
            scores = scores.masked_fill(drop.scatter(1, order, drop), VlmTune.Models.Init.NegativeInfinity);
        }
        var probs = scores.softmax(-1).cpu();
        return probs.multinomial(1, false, _generator).squeeze(-1).to(logits.device).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The first maximum of each row, (B, V) → (B), as argmax; throws <see cref="NonFiniteScoresException"/> for a row
    /// whose maximum is NaN or +inf (NaN propagates through max), which no sampling can make a token of.
    /// </summary>
    internal static Tensor FiniteMax(Tensor scores)
    {
        var (values, indices) = scores.max(-1);
        if (!values.isfinite().all().item<bool>()) throw new NonFiniteScoresException();
        return indices;
    }

    public void Dispose() => _generator?.Dispose();
}

/// <summary>The model gave NaN or infinite scores for a sequence (e.g. broken weights): that sequence cannot go on.</summary>
public sealed class NonFiniteScoresException() : VlmTuneException("The model produced non-finite scores (NaN or inf) for this sequence; its weights or inputs are broken.");
