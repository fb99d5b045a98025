namespace VlmTune.Inference;

/// <summary>How the next token is chosen. Temperature 0 is greedy; otherwise HF's order: repetition penalty, temperature, top-k, top-p.</summary>
public sealed record SamplingOptions
{
    public double Temperature { get; init; }
    public double TopP { get; init; } = 1.0;
    public int TopK { get; init; }
    public double RepetitionPenalty { get; init; } = 1.0;
    public long? Seed { get; init; }
    public int MaxNewTokens { get; init; } = 512;

    public bool Greedy => Temperature <= 0;

    public IEnumerable<string> Validate()
    {
        if (Temperature < 0 || double.IsNaN(Temperature)) yield return $"temperature must be ≥ 0 (got {Temperature}).";
        if (!(TopP > 0 && TopP <= 1)) yield return $"top_p must be in (0, 1] (got {TopP}).";
        if (TopK < 0) yield return $"top_k must be ≥ 0 (got {TopK}).";
        if (!(RepetitionPenalty > 0)) yield return $"repetition_penalty must be > 0 (got {RepetitionPenalty}).";
        if (MaxNewTokens < 1) yield return $"max_new_tokens must be ≥ 1 (got {MaxNewTokens}).";
    }
}
