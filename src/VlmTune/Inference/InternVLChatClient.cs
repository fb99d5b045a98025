using System.Runtime.CompilerServices;
using Microsoft.Extensions.AI;
using VlmTune.Text;
using VlmTune.Vision;
using ChatMessage = Microsoft.Extensions.AI.ChatMessage;
using static TorchSharp.torch;

namespace VlmTune.Inference;

/// <summary>Limits and defaults of <see cref="InternVLChatClient"/> (the server sets them from its options).</summary>
public sealed record ChatClientOptions
{
    /// <summary>
    /// The base model's name, reported in responses (and accepted by the server). <see cref="ChatOptions.ModelId"/>
    /// picks this or one of the engine's adapters.
    /// </summary>
    public string ModelId { get; init; } = "internvl2";
    /// <summary><see cref="SamplingOptions.MaxNewTokens"/> when a request gives none (capped by what the context leaves).</summary>
    public int DefaultMaxNewTokens { get; init; } = 512;
    /// <summary>Largest <see cref="SamplingOptions.MaxNewTokens"/> a request may ask for.</summary>
    public int MaxNewTokensLimit { get; init; } = 4096;
    public int MaxImagesPerRequest { get; init; } = 8;
    /// <summary>Tiles of all images of a request together (each image is 1..max_tiles + thumbnail).</summary>
    public int MaxTilesPerRequest { get; init; } = 64;
    /// <summary>Smallest width and height of an image; 1×1 "images" are tracking pixels or mistakes, not pictures.</summary>
    public int MinImageSide { get; init; } = 2;
    /// <summary>Largest image accepted, checked from its header before anything is decoded.</summary>
    public ImageLimits ImageLimits { get; init; } = ImageLimits.Default;
}

/// <summary>A prompt ready for the engine, and what the answer is cut at.</summary>
public sealed class PreparedChat(GenerationRequest request, IReadOnlyList<int> tiles, IReadOnlyList<string> stopSequences) : IDisposable
{
    public GenerationRequest Request { get; } = request;
    public IReadOnlyList<int> Tiles { get; } = tiles;
    public IReadOnlyList<string> StopSequences { get; } = stopSequences;
    public void Dispose() => Request.Pixels?.Dispose();
}

/// <summary>One piece of a streamed answer: new text and the token ids behind it; the last piece carries the finish reason.</summary>
/// <paramref name="CachedPromptTokens"/>: prompt tokens served from the engine's prefix cache (set on the last piece).
public sealed record ChatChunk(string Text, IReadOnlyList<int> TokenIds, FinishReason? FinishReason, int PromptTokens, int CompletionTokens, int CachedPromptTokens = 0);

/// <summary>The request is wrong in a way the caller can fix (400); <see cref="InvalidGenerationRequestException.Param"/> names the field.</summary>
public sealed class ChatInputException(string message, string? param = null) : InvalidGenerationRequestException(message, param);

/// <summary>
/// <see cref="IChatClient"/> over an <see cref="InferenceEngine"/>: messages with text and <see cref="DataContent"/>
/// images become the official InternVL prompt (template, system message, &lt;image&gt; placeholders), and answers
/// stream as the engine produces tokens. Many callers may use one client at once; their requests batch together.
/// </summary>
public sealed class InternVLChatClient : IChatClient
{
    private readonly InternVLChat _chat;
    private readonly InferenceEngine _engine;
    private readonly ChatClientOptions _options;
    private readonly ChatClientMetadata _metadata;
    private readonly ImageProcessor _lowDetail;

    public InternVLChatClient(InternVLChat chat, InferenceEngine engine, ChatClientOptions? options = null)
    {
        _chat = chat; _engine = engine; _options = options ?? new ChatClientOptions();
        _metadata = new ChatClientMetadata("vlmtune", null, _options.ModelId);
        _lowDetail = new ImageProcessor(chat.Images.Options with { MaxTiles = 1 });
        MaxCharsPerToken = chat.Tokenizer.LongestTokenLength;
    }

    /// <summary>
    /// The most UTF-16 characters one token can stand for (<see cref="TextTokenizer.LongestTokenLength"/>; 128 for
    /// InternLM2: a run of spaces).
    /// </summary>
    public int MaxCharsPerToken { get; }

    /// <summary>Longest text, in characters, that a request may hold; longer ones are refused before tokenising.</summary>
    public long MaxPromptChars => (long)_engine.ContextLimit * MaxCharsPerToken;

    public InternVLChat Chat => _chat;
    public InferenceEngine Engine => _engine;
    public ChatClientOptions Options => _options;

    // ------------------------------------------------------------------ IChatClient

    public async Task<ChatResponse> GetResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default)
    {
        var text = new System.Text.StringBuilder();
        ChatChunk? last = null;
        await foreach (var chunk in GenerateAsync(messages, options, cancellationToken).ConfigureAwait(false))
        {
            text.Append(chunk.Text);
            last = chunk;
        }
        return new ChatResponse(new ChatMessage(ChatRole.Assistant, text.ToString()))
        {
            FinishReason = Map(last?.FinishReason),
            ModelId = options?.ModelId ?? _options.ModelId,
            CreatedAt = DateTimeOffset.UtcNow,
            ResponseId = NewId(),
            Usage = Usage(last),
        };
    }

    public async IAsyncEnumerable<ChatResponseUpdate> GetStreamingResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null,
        [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        var id = NewId();
        await foreach (var chunk in GenerateAsync(messages, options, cancellationToken).ConfigureAwait(false))
        {
            var update = new ChatResponseUpdate(ChatRole.Assistant, chunk.Text) { ResponseId = id, MessageId = id, ModelId = options?.ModelId ?? _options.ModelId, CreatedAt = DateTimeOffset.UtcNow };
            if (chunk.FinishReason is { } reason)
            {
                update.FinishReason = Map(reason);
                update.Contents.Add(new UsageContent(Usage(chunk)!));
            }
            yield return update;
        }
    }

    public object? GetService(Type serviceType, object? serviceKey = null) =>
        serviceKey is not null ? null
        : serviceType == typeof(ChatClientMetadata) ? _metadata
        : serviceType.IsInstanceOfType(this) ? this
        : serviceType.IsInstanceOfType(_engine) ? _engine
        : null;

    /// <summary>The client does not own the engine or the model: whoever built them disposes them.</summary>
    public void Dispose() { }

    // ------------------------------------------------------------------ generation

    /// <summary>Prepares and runs one chat request, streaming text pieces; cancelling (or stopping the enumeration) frees its place in the batch.</summary>
    public async IAsyncEnumerable<ChatChunk> GenerateAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null,
        [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        using var prepared = Prepare(messages, options);
        await foreach (var chunk in GenerateAsync(prepared, cancellationToken).ConfigureAwait(false)) yield return chunk;
    }

    /// <summary>
    /// Submits a prepared request at once (so a full queue or a request too long for the context throws here, before
    /// anything is streamed) and returns its pieces; stopping the enumeration early cancels the request.
    /// </summary>
    public IAsyncEnumerable<ChatChunk> GenerateAsync(PreparedChat prepared, CancellationToken cancellationToken = default)
    {
        var stop = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        try { return Read(_engine.Submit(prepared.Request, stop.Token), stop, prepared.StopSequences, cancellationToken); }
        catch { stop.Dispose(); throw; }
    }

    private async IAsyncEnumerable<ChatChunk> Read(GenerationStream stream, CancellationTokenSource stop, IReadOnlyList<string> stopSequences,
        [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        int prompt = stream.PromptTokens, completion = 0;
        var decoder = _chat.Tokenizer.CreateStreamDecoder();
        var filter = new StopSequenceFilter(stopSequences);
        var ids = new List<int>();
        try
        {
            await foreach (var id in stream.ReadTokensAsync(cancellationToken).ConfigureAwait(false))
            {
                completion++;
                ids.Add(id);
                var text = filter.Push(decoder.Push(id));
                if (filter.Stopped)
                {
                    stop.Cancel();   // the rest of the answer is not wanted: leave the batch now
                    yield return new ChatChunk(text, ids.ToArray(), FinishReason.Stop, prompt, completion, stream.CachedPromptTokens);
                    yield break;
                }
                if (text.Length > 0)
                {
                    yield return new ChatChunk(text, ids.ToArray(), null, prompt, completion);
                    ids.Clear();
                }
            }
            var result = await stream.Completion.ConfigureAwait(false);
            cancellationToken.ThrowIfCancellationRequested();
            var rest = filter.Push(decoder.Flush()) + filter.Flush();
            yield return new ChatChunk(rest, ids.ToArray(), filter.Stopped ? FinishReason.Stop : result.FinishReason, prompt, completion, stream.CachedPromptTokens);
        }
        finally
        {
            // A consumer that stops early (a client that went away) cancels the request.
            if (!stream.Completion.IsCompleted) stop.Cancel();
            stop.Dispose();
        }
    }

    /// <summary>The model ids this client answers for: the base model's, then every served adapter's.</summary>
    public IReadOnlyList<string> ModelIds => [_options.ModelId, .. (_engine.Adapters?.All ?? []).Select(a => a.Name)];

    /// <summary>
    /// The adapter <paramref name="modelId"/> names; null for the base model (or no id). Throws
    /// <see cref="UnknownModelException"/> for an id this client does not serve.
    /// </summary>
    public ServedAdapter? ResolveModel(string? modelId)
    {
        if (modelId is null || modelId == _options.ModelId) return null;
        if (_engine.Adapters?.Find(modelId) is { } adapter) return adapter;
        var served = ModelIds;
        string list = string.Join(", ", served.Take(8).Select(m => $"'{m}'")) + (served.Count > 8 ? $" and {served.Count - 8} more (GET /v1/models)" : "");
        throw new UnknownModelException($"The model '{ModelNames.Clip(modelId)}' does not exist; this server serves {list}.");
    }

    /// <summary>
    /// Builds the engine request: system messages (and <see cref="ChatOptions.Instructions"/>) become the system
    /// message, earlier user/assistant pairs the history, the last user message the question. A user message's
    /// images go where its text has &lt;image&gt; placeholders, or before its text when it has none.
    /// <see cref="ChatOptions.ModelId"/> picks the adapter (<see cref="ResolveModel"/>).
    /// </summary>
    public PreparedChat Prepare(IEnumerable<ChatMessage> messages, ChatOptions? options = null)
    {
        var adapter = ResolveModel(options?.ModelId);
        var system = new List<string>();
        if (!string.IsNullOrEmpty(options?.Instructions)) system.Add(options.Instructions);
        var turns = new List<(ChatRole Role, string Text)>();
        var images = new List<DataContent>();
        int index = -1;
        foreach (var message in messages)
        {
            index++;
            string where = $"messages[{index}]";
            var role = message.Role;
            if (role != ChatRole.System && role != ChatRole.User && role != ChatRole.Assistant)
                throw new ChatInputException($"{where}: role '{role}' is not supported (system, user, assistant).", where + ".role");
            var texts = new List<string>();
            var own = new List<DataContent>();
            foreach (var content in message.Contents)
            {
                switch (content)
                {
                    case TextContent t: texts.Add(t.Text); break;
                    case DataContent d when d.HasTopLevelMediaType("image"):
                        if (role != ChatRole.User) throw new ChatInputException($"{where}: only user messages may hold images.", where + ".content");
                        own.Add(d);
                        break;
                    case DataContent d: throw new ChatInputException($"{where}: content of type '{d.MediaType}' is not supported (text and images).", where + ".content");
                    default: throw new ChatInputException($"{where}: {content.GetType().Name} content is not supported (text and images).", where + ".content");
                }
            }
            var text = string.Join("\n", texts);
            foreach (var reserved in new[] { SpecialTokens.ImgContext, SpecialTokens.ImgStart, SpecialTokens.ImgEnd })
                if (text.Contains(reserved, StringComparison.Ordinal))
                    throw new ChatInputException($"{where}: the text holds '{reserved}', which is reserved for image embeddings.", where + ".content");
            int placeholders = ImagePlaceholders.Count(text);
            if (role != ChatRole.User && placeholders > 0)
                throw new ChatInputException($"{where}: '{ImagePlaceholders.Placeholder}' placeholders are only allowed in user messages.", where + ".content");
            if (role == ChatRole.User)
            {
                if (placeholders == 0 && own.Count > 0) text = string.Concat(Enumerable.Repeat(ImagePlaceholders.Placeholder + "\n", own.Count)) + text;
                else if (placeholders != own.Count)
                    throw new ChatInputException($"{where}: the text has {placeholders} '{ImagePlaceholders.Placeholder}' placeholder(s) but the message has {own.Count} image(s); write one per image, or none to put the images first.", where + ".content");
                images.AddRange(own);
            }
            if (role == ChatRole.System) { system.Add(text); continue; }
            // Consecutive messages of one role read as one message.
            if (turns.Count > 0 && turns[^1].Role == role) turns[^1] = (role, turns[^1].Text + "\n" + text);
            else turns.Add((role, text));
        }
        if (turns.Count == 0 || turns[^1].Role != ChatRole.User)
            throw new ChatInputException("The conversation must end with a user message.", "messages");
        if (turns[0].Role != ChatRole.User)
            throw new ChatInputException("The conversation must start (after system messages) with a user message.", "messages");
        if (images.Count > _options.MaxImagesPerRequest)
            throw new ChatInputException($"The request has {images.Count} images; at most {_options.MaxImagesPerRequest} are allowed.", "image_url");
        // Tokenising costs time and memory in proportion to the text: what cannot fit is refused by its length first.
        long chars = system.Sum(t => (long)t.Length) + turns.Sum(t => (long)t.Text.Length);
        if (chars > MaxPromptChars)
            throw new ChatInputException($"The messages hold {chars:N0} characters; at most {MaxPromptChars:N0} can fit in the context of {_engine.ContextLimit} tokens (a token stands for at most {MaxCharsPerToken} characters); shorten the conversation.", "messages");

        var history = new List<ChatTurn>();
        for (int i = 0; i + 1 < turns.Count; i += 2) history.Add(new ChatTurn(turns[i].Text, turns[i + 1].Text));
        string question = turns[^1].Text;

        var sampling = SamplingFor(options);
        var processed = new List<ProcessedImage>();
        try
        {
            for (int i = 0; i < images.Count; i++) processed.Add(ProcessImage(images[i], i));
            var tiles = processed.Select(p => p.TileCount).ToList();
            if (tiles.Sum() > _options.MaxTilesPerRequest)
                throw new ChatInputException($"The images make {tiles.Sum()} tiles; at most {_options.MaxTilesPerRequest} are allowed per request (send fewer or smaller images).", "image_url");
            var prompt = ChatPrompt.Build(_chat.Tokenizer, _chat.Template, question, tiles, _chat.Model.Config.NumImageToken, history,
                system.Count > 0 ? string.Join("\n", system) : null);
            int room = _engine.ContextLimit - prompt.InputIds.Length;
            if (room < 1)
                throw new ChatInputException($"The prompt is {prompt.InputIds.Length} tokens, which leaves no room in the context of {_engine.ContextLimit}; shorten the conversation or send fewer images.", "messages");
            if (options?.MaxOutputTokens is null) sampling = sampling with { MaxNewTokens = Math.Min(_options.DefaultMaxNewTokens, room) };
            Tensor? pixels = processed.Count == 0 ? null : cat(processed.Select(p => p.PixelValues).ToList(), 0).DetachFromDisposeScope();
            var request = new GenerationRequest { PromptIds = prompt.InputIds, Pixels = pixels, ImageTiles = tiles, Sampling = sampling, StopIds = _chat.StopIds, Adapter = adapter };
            return new PreparedChat(request, tiles, options?.StopSequences?.ToArray() ?? []);
        }
        finally { foreach (var p in processed) p.Dispose(); }
    }

    private ProcessedImage ProcessImage(DataContent image, int index)
    {
        string name = $"image {index + 1}";
        var bytes = image.Data.ToArray();
        ImageInfo info;
        try { info = ImageDecoder.ReadInfo(bytes, name); }
        catch (ImageException e) { throw new ChatInputException(e.Message, "image_url"); }
        if (info.Width < _options.MinImageSide || info.Height < _options.MinImageSide)
            throw new ChatInputException($"{name} is {info.Width}x{info.Height}; images must be at least {_options.MinImageSide}x{_options.MinImageSide} pixels.", "image_url");
        try { _options.ImageLimits.Check(info.Width, info.Height, name); }
        catch (ImageException e) { throw new ChatInputException(e.Message, "image_url"); }
        // OpenAI's detail "low" asks for a cheap look: one 448-px tile, as dynamic_preprocess with max_num 1.
        bool low = image.AdditionalProperties?.TryGetValue("detail", out var detail) == true && detail as string == "low";
        var processor = low ? _lowDetail : _chat.Images;
        try { return processor.Process(bytes, name); }
        catch (ImageException e) { throw new ChatInputException(e.Message, "image_url"); }
    }

    /// <summary>
    /// The sampling a request's <paramref name="options"/> ask for, checked (<see cref="SamplingOptions.Problems"/> with
    /// <see cref="ChatClientOptions.MaxNewTokensLimit"/>): a <see cref="ChatInputException"/> names the field at fault.
    /// <see cref="Prepare"/> calls it; the server calls it first too, so bad parameters are refused before images are read.
    /// </summary>
    public SamplingOptions SamplingFor(ChatOptions? options)
    {
        var s = new SamplingOptions { MaxNewTokens = _options.DefaultMaxNewTokens };
        if (options is null) return s;
        if (options.Temperature is { } t) s = s with { Temperature = t };
        if (options.TopP is { } p) s = s with { TopP = p };
        if (options.TopK is { } k) s = s with { TopK = k };
        if (options.Seed is { } seed) s = s with { Seed = seed };
        if (options.AdditionalProperties?.TryGetValue("repetition_penalty", out var rp) == true && rp is not null)
        {
            try { s = s with { RepetitionPenalty = Convert.ToDouble(rp, System.Globalization.CultureInfo.InvariantCulture) }; }
            catch (Exception e) when (e is FormatException or InvalidCastException or OverflowException)
            {
                throw new ChatInputException($"repetition_penalty must be a number (got '{rp}').", "repetition_penalty");
            }
        }
        if (options.MaxOutputTokens is { } max) s = s with { MaxNewTokens = max };
        var problems = new List<(string Param, string Message)>();
        if (options.Temperature is > 2) problems.Add(("temperature", $"temperature must be between 0 and 2 (got {options.Temperature})."));
        problems.AddRange(s.Problems(_options.MaxNewTokensLimit));
        if (problems.Count > 0) throw new ChatInputException(string.Join(" ", problems.Select(p => p.Message)), problems[0].Param);
        return s;
    }

    private static ChatFinishReason? Map(FinishReason? reason) => reason switch
    {
        FinishReason.Stop => ChatFinishReason.Stop,
        FinishReason.Length => ChatFinishReason.Length,
        _ => null,
    };

    private static UsageDetails? Usage(ChatChunk? last) => last is null ? null
        : new UsageDetails { InputTokenCount = last.PromptTokens, OutputTokenCount = last.CompletionTokens, TotalTokenCount = last.PromptTokens + last.CompletionTokens };

    private static string NewId() => "chatcmpl-" + Guid.NewGuid().ToString("N")[..24];
}
