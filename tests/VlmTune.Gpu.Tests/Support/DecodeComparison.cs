using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Gpu.Tests.Support;

/// <summary>
/// How close two bfloat16 decoders' logits must be. Both paths store bf16, accumulate in fp32 and round at the same
/// points; they differ in summation order (and where attention keeps its probabilities), which flips some bf16
/// roundings of intermediates, and the flips propagate. bf16 keeps 8 significant bits: one ulp at x is
/// 2^(⌊log2 x⌋ − 7), 1/64 between 2 and 4. Measured with TorchSharp on the CPU, on the 2-layer models these tests
/// decode: SDPA against exact attention (another order, same rounding points) 1–2.5 ulps of the step's largest
/// |logit|, 1 − centred cosine ≤ 7e-5; bf16 against fp32 on the same weights ≤ 2.7 ulps, ≤ 1.1e-4. The bounds:
/// <list type="bullet">
/// <item>max |Δlogit| ≤ 8 ulps of the step's largest |logit|: the sum of two paths' own bf16 errors (2 × 2.7) with
/// room; `bench decode --check` saw 3.5–5 ulps on 24–28-layer models. Planted bugs on the shape-true models (a
/// position off by one, one more masked key, a dropped q/k/v bias, unit q/k or final-norm weights) give 14–57 ulps
/// and cosines ≤ 0.996 (ToleranceSensitivityTests); on the Phi-3 one, longrope's cos/sin scale left out 38–55 ulps,
/// the short factors kept past the original context 180–195 ulps.</item>
/// <item>centred cosine per row ≥ 0.9998 (relative RMS error ≤ 2% of the row's spread): 1 − cosine 3× the noise
/// above; it catches an error spread thinly over the vocabulary that the max misses.</item>
/// <item>a greedy choice is clear when the reference's top-2 margin exceeds twice the max-abs bound: no error within
/// it can flip the choice, so both decoders must pick the same token there.</item>
/// </list>
/// </summary>
public static class LogitTolerance
{
    public const double Ulps = 8;
    public const double MinCentredCosine = 0.9998;

    /// <summary>One bf16 ulp at |x| (x > 0): 8 significant bits.</summary>
    public static double Bf16Ulp(double x) => Math.Pow(2, Math.Floor(Math.Log2(x)) - 7);

    public static double For(double maxAbsLogit) => Ulps * Bf16Ulp(Math.Max(maxAbsLogit, 1e-30));

    /// <summary>Compares one step's logits (B, V) of the reference (<paramref name="want"/>) and the candidate.</summary>
    public static StepAgreement Compare(int step, Tensor want, Tensor got)
    {
        using var scope = NewDisposeScope();
        var w = want.to_type(ScalarType.Float32);
        var g = got.to_type(ScalarType.Float32);
        double maxAbs = w.abs().max().item<float>();
        double maxDiff = (w - g).abs().max().item<float>();
        double tol = For(maxAbs);
        var wc = w - w.mean([1L], keepdim: true);
        var gc = g - g.mean([1L], keepdim: true);
        var cosine = (wc * gc).sum(1) / ((wc * wc).sum(1) * (gc * gc).sum(1)).sqrt().clamp_min(1e-30);   // (B)
        double minCos = cosine.min().item<float>();
        var top2 = w.topk(2, -1).values;                                                          // (B, 2)
        var clear = (top2[.., 0] - top2[.., 1]) > 2 * tol;                                        // (B)
        var disagree = w.argmax(-1).ne(g.argmax(-1)).logical_and(clear);
        return new StepAgreement(step, maxAbs, maxDiff, tol, minCos, clear.sum().item<long>(), disagree.sum().item<long>());
    }
}

/// <summary>One decode step's comparison (see <see cref="LogitTolerance"/>).</summary>
public sealed record StepAgreement(int Step, double MaxAbsLogit, double MaxAbsDiff, double Tolerance, double MinCentredCosine, long ClearChoices, long ClearDisagreements)
{
    public bool Within => MaxAbsDiff <= Tolerance && MinCentredCosine >= LogitTolerance.MinCentredCosine && ClearDisagreements == 0;

    public override string ToString() =>
        $"step {Step}: max |Δlogit| {MaxAbsDiff:g4} (tolerance {Tolerance:g4} = {LogitTolerance.Ulps} ulps of max |logit| {MaxAbsLogit:g4}, " +
        $"{MaxAbsDiff / LogitTolerance.Bf16Ulp(Math.Max(MaxAbsLogit, 1e-30)):0.#} ulps), min centred cosine {MinCentredCosine:0.######}, " +
        $"clear greedy choices {ClearChoices}, of them different {ClearDisagreements}";
}

/// <summary>
/// Teacher-forced decoding, as `bench decode --check` runs it: one prefill of B different random prompts by the
/// reference (TorchSharp) path, then each decoder steps on its own copy of that cache, both fed the reference's greedy
/// tokens. Ragged rows: row r sees its first r·P/(2B) columns masked and positions shifted to match, as the serving
/// engine's right-aligned batches do; aligned rows pass no positions or mask (the decoders' defaults).
/// </summary>
public static class DecodeComparison
{
    /// <summary>One candidate step: logits (B, V) for <c>token</c> (B, 1), appending to <c>cache</c>.</summary>
    public delegate Tensor Stepper(Tensor token, KvCache cache, StepRows rows);

    /// <summary>Positions (B, 1) int64, first valid columns (B) int32 and the key mask (B, S + 1); all null for aligned rows.</summary>
    public sealed record StepRows(Tensor? Positions, Tensor? FirstColumn, Tensor? KeyMask);

    public sealed record Result(IReadOnlyList<StepAgreement> Steps, KvCache Reference, KvCache Candidate) : IDisposable
    {
        /// <summary>Both caches hold as many entries, at the same positions (the table the engine re-rotates and restacks from).</summary>
        public bool CachesAgree()
        {
            long length = Reference.Length;
            return Candidate.Length == length
                && Reference.PositionsTensor.narrow(1, 0, length).eq(Candidate.PositionsTensor.narrow(1, 0, length)).all().item<bool>();
        }

        public void Dispose() { Reference.Dispose(); Candidate.Dispose(); }
    }

    public static Result Run(CausalLanguageModel lm, Device device, int batch, bool ragged, int promptTokens, int steps, Stepper candidate, int seed)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var c = lm.Config;
        var rng = new Random(seed);
        var ids = tensor(Enumerable.Range(0, batch * promptTokens).Select(_ => (long)rng.Next(0, c.VocabSize)).ToArray(), device: device)
            .view(batch, promptTokens);                                                                 // (B, P), a prompt per row
        using var prefilled = new KvCache(c, batch, promptTokens, lm.TokenEmbedding.weight.dtype, device);
        var hidden = lm.Forward(lm.Embed(ids), new DecoderInputs { Cache = prefilled });
        var token = lm.Logits(hidden[.., ^1..]).argmax(-1).view(batch, 1);                              // (B, 1)

        var rows = Enumerable.Range(0, batch).Select(r => new KvRow(prefilled, r, promptTokens)).ToList();
        var reference = KvCache.Stack(rows, promptTokens + steps);
        var other = KvCache.Stack(rows, promptTokens + steps);
        var starts = Enumerable.Range(0, batch).Select(r => ragged ? r * (long)(promptTokens / (2 * batch)) : 0).ToArray();
        var firstColumn = tensor(starts.Select(s => (int)s).ToArray(), device: device);                   // (B)
        var startsColumn = tensor(starts, device: device).view(batch, 1);                                 // (B, 1)
        var agreements = new List<StepAgreement>();
        for (int i = 0; i < steps; i++)
        {
            using var step = NewDisposeScope();
            long length = promptTokens + i;
            var stepRows = ragged
                ? new StepRows((tensor(length, device: device) - startsColumn).contiguous(), firstColumn,
                    arange(length + 1, device: device).unsqueeze(0) >= startsColumn)
                : new StepRows(null, null, null);
            var h = lm.Forward(lm.Embed(token), new DecoderInputs { PositionIds = stepRows.Positions, Cache = reference, KeyMask = stepRows.KeyMask });
            var want = lm.Logits(h)[.., 0];                                                               // (B, V)
            var got = candidate(token, other, stepRows);
            agreements.Add(LogitTolerance.Compare(i, want, got));
            token = want.argmax(-1).view(batch, 1).contiguous().MoveToOuterDisposeScope();
        }
        return new Result(agreements, reference, other);
    }

    /// <summary>The failing steps, or null when every step is within the tolerance.</summary>
    public static string? Failures(IReadOnlyList<StepAgreement> steps) =>
        steps.Any(s => !s.Within) ? string.Join("\n", steps.Where(s => !s.Within)) : null;
}
