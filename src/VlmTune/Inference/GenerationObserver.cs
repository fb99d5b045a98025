namespace VlmTune.Inference;

/// <summary>
/// What an <see cref="InferenceEngine"/> tells about one request while it runs it (the server's /metrics counts and
/// times these). Each call comes from the engine's loop thread at a point the engine reaches anyway — a token is
/// reported after the step has already brought its id to the CPU — so observing costs no device synchronisation.
/// Implementations must be quick and must not throw: a throwing observer fails its own request.
/// </summary>
public interface IGenerationObserver
{
    /// <summary>The request left the queue and joins the batch (its images are encoded and its prompt prefilled next).</summary>
    void Admitted();

    /// <summary>The vision model encoded the request's <paramref name="tiles"/> image tiles.</summary>
    void TilesEncoded(int tiles);

    /// <summary>The prompt's <paramref name="tokens"/> went through the model (prefill); its first token follows.</summary>
    void Prefilled(int tokens);

    /// <summary>One token of the answer was produced (a stop id, which is not part of the answer, is not reported).</summary>
    void Token();
}
