using System.Runtime.CompilerServices;
using System.Threading.Channels;
using static TorchSharp.torch;

namespace VlmTune.Inference;

/// <summary>One prompt to complete: token ids (with &lt;IMG_CONTEXT&gt; slots), the images' tiles, sampling and stop ids.</summary>
public sealed record GenerationRequest
{
    public required IReadOnlyList<int> PromptIds { get; init; }

    /// <summary>
    /// Tiles of every image in prompt order, (N, 3, 448, 448) float; 256 &lt;IMG_CONTEXT&gt; ids per tile in the prompt.
    /// The engine takes ownership and disposes it once encoded.
    /// </summary>
    public Tensor? Pixels { get; init; }

    /// <summary>
    /// Tiles of each image of <see cref="Pixels"/>, in order (they sum to its first dimension): where one image ends and
    /// the next begins, so the engine's image-feature cache can reuse each image on its own. Null: all of
    /// <see cref="Pixels"/> is cached as one unit.
    /// </summary>
    public IReadOnlyList<int>? ImageTiles { get; init; }

    public SamplingOptions Sampling { get; init; } = new();

    /// <summary>Ids that end the answer (not part of it), e.g. &lt;|im_end|&gt; and &lt;/s&gt;.</summary>
    public IReadOnlySet<int> StopIds { get; init; } = new HashSet<int>();

    /// <summary>Told what the engine does with this request (admission, tiles, prefill, each token); null: nobody listens.</summary>
    public IGenerationObserver? Observer { get; init; }
    /// <summary>The adapter to answer with (one of the engine's <see cref="InferenceEngine.Adapters"/>); null: the base model.</summary>
    public ServedAdapter? Adapter { get; init; }
}

/// <summary>
/// A running request: its tokens as they are produced, and how it ended. Reading is optional; the token channel is
/// unbounded so a slow reader never stalls the batch.
/// </summary>
public sealed class GenerationStream
{
    private readonly ChannelReader<int> _tokens;

    private readonly Func<int> _cachedPromptTokens;

    internal GenerationStream(ChannelReader<int> tokens, Task<GenerationResult> completion, int promptTokens, Func<int>? cachedPromptTokens = null)
    {
        _tokens = tokens;
        Completion = completion;
        PromptTokens = promptTokens;
        _cachedPromptTokens = cachedPromptTokens ?? (() => 0);
    }

    public int PromptTokens { get; }

    /// <summary>
    /// Prompt tokens whose keys and values came from the engine's prefix cache rather than a prefill (OpenAI's
    /// usage.prompt_tokens_details.cached_tokens): known once the request is admitted, 0 before.
    /// </summary>
    public int CachedPromptTokens => _cachedPromptTokens();

    /// <summary>Completes when the request ends: stop id, token limit, cancellation (FinishReason.Cancelled), or faults on an engine error.</summary>
    public Task<GenerationResult> Completion { get; }

    /// <summary>Token ids in order as they are generated; ends when the request ends.</summary>
    public async IAsyncEnumerable<int> ReadTokensAsync([EnumeratorCancellation] CancellationToken cancellation = default)
    {
        while (await _tokens.WaitToReadAsync(cancellation).ConfigureAwait(false))
            while (_tokens.TryRead(out var id)) yield return id;
    }
}
