namespace VlmTune.Inference;

/// <summary>How the next token is chosen. Temperature 0 is greedy; otherwise HF's order: repetition penalty, temperature, top-k, top-p.</summary>
public sealed record SamplingOptions
{
    /// <summary>
    /// Temperatures below this are greedy (as vLLM's sampling epsilon): dividing fp32 logits by a smaller one
    /// overflows to inf (5e-39 is a subnormal float), and the distribution it asks for is the argmax anyway.
    /// </summary>
    public const double MinSamplingTemperature = 1e-5;

    /// <summary>Range of repetition penalties: far outside it the penalty only ever forces or forbids seen tokens, and its fp32 factor underflows to 0 or overflows.</summary>
    public const double MinRepetitionPenalty = 0.01, MaxRepetitionPenalty = 100;

    public double Temperature { get; init; }
    public double TopP { get; init; } = 1.0;
    public int TopK { get; init; }
    public double RepetitionPenalty { get; init; } = 1.0;
    public long? Seed { get; init; }
    /// <summary>Most tokens to generate: the one name of what arrives as max_tokens / max_completion_tokens (HTTP),
    /// <c>ChatOptions.MaxOutputTokens</c> (IChatClient) and <c>--max-new-tokens</c> (CLI); checked by <see cref="Problems"/> only.</summary>
    public int MaxNewTokens { get; init; } = 512;

    public bool Greedy => Temperature < MinSamplingTemperature;

    public IEnumerable<string> Validate(int? maxNewTokensLimit = null) => Problems(maxNewTokensLimit).Select(p => p.Message);

    /// <summary>
    /// Every problem with the field it concerns, named as the OpenAI API names it. <paramref name="maxNewTokensLimit"/>:
    /// the largest <see cref="MaxNewTokens"/> the caller allows (a server's limit); null: any ≥ 1.
    /// </summary>
    public IEnumerable<(string Param, string Message)> Problems(int? maxNewTokensLimit = null)
    {
        if (!(Temperature >= 0 && double.IsFinite(Temperature))) yield return ("temperature", $"temperature must be a finite number ≥ 0 (got {Temperature}).");
        if (!(TopP > 0 && TopP <= 1)) yield return ("top_p", $"top_p must be in (0, 1] (got {TopP}).");
        if (TopK < 0) yield return ("top_k", $"top_k must be ≥ 0 (got {TopK}).");
        if (!(RepetitionPenalty >= MinRepetitionPenalty && RepetitionPenalty <= MaxRepetitionPenalty))
            yield return ("repetition_penalty", $"repetition_penalty must be between {MinRepetitionPenalty} and {MaxRepetitionPenalty} (got {RepetitionPenalty}).");
        if (MaxNewTokens < 1 || MaxNewTokens > maxNewTokensLimit)
            yield return ("max_tokens", maxNewTokensLimit is { } limit
                ? $"max_tokens must be between 1 and {limit} (got {MaxNewTokens})."
                : $"max_tokens must be ≥ 1 (got {MaxNewTokens}).");
    }
}
