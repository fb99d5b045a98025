using System.Text.Json;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.AI;
using VlmTune.Inference;
using ChatMessage = Microsoft.Extensions.AI.ChatMessage;

namespace VlmTune.Serving;

/// <summary><c>POST /v1/chat/completions</c>: OpenAI's chat API, plain JSON or server-sent events.</summary>
public static class ChatCompletionsApi
{
    public const string Path = "/v1/chat/completions";

    public static IEndpointRouteBuilder MapChatCompletionsApi(this IEndpointRouteBuilder app)
    {
        app.MapPost(Path, Handle);
        return app;
    }

    private static async Task Handle(HttpContext context, ServingState state)
    {
        var aborted = context.RequestAborted;
        long? length = context.Request.ContentLength;
        if (length > state.Options.MaxRequestBytes) throw TooLarge();
        bool large = length is null or > ServingState.LargeBodyBytes;
        // A small body is read before admission (a client that never sends it holds no slot); a large one is admitted
        // first and then waits for its turn to be read, so concurrent large bodies never sit in memory together.
        byte[]? small = large ? null : await ReadBodyAsync(context.Request, state.Options.MaxRequestBytes, preallocate: false, aborted);

        using var slot = state.Enter();
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(aborted, state.ShutdownGraceOver);
        deadline.CancelAfter(TimeSpan.FromSeconds(state.Options.RequestTimeoutSeconds));
        try
        {
            var preparing = PrepareAsync(context, state, small, deadline.Token);
            small = null;   // PrepareAsync has it: this state machine must not keep it alive while the answer streams
            var (prepared, stream, includeUsage, model) = await preparing;
            using (prepared)
            {
                IAsyncEnumerable<ChatChunk> chunks;
                Record(context)?.Submitted();
                try { chunks = state.Client.GenerateAsync(prepared, deadline.Token); }
                catch (EngineBusyException e) { throw new ApiException(429, e.Message, null, "rate_limit_exceeded"); }
                catch (UnknownModelException e) { throw ModelsApi.NotFound(e); }   // unloaded since it was resolved
                catch (InvalidGenerationRequestException e) { throw ApiException.BadRequest(e.Message, e.Param); }
                var id = "chatcmpl-" + Guid.NewGuid().ToString("N")[..24];
                long created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
                if (stream) await StreamAsync(context, state, includeUsage, chunks, id, created, model);
                else await AnswerAsync(context, chunks, id, created, model);
            }
        }
        catch (OperationCanceledException) when (deadline.IsCancellationRequested && !aborted.IsCancellationRequested)
        {
            if (!context.Response.HasStarted) throw CancelledBy(state);
            Record(context)?.Count("error", CancelledBy(state).Status);
        }
    }

    /// <summary>The request's line in /metrics (set by <see cref="MetricsApi.CountChatRequests"/>).</summary>
    private static ChatRequestRecord? Record(HttpContext context) => context.Features.Get<ChatRequestRecord>();

    /// <summary>
    /// Body → request → messages (images read) → prompt and tiles. A method of its own so that the body, the parsed
    /// request and the images' bytes are garbage once it returns, not kept by the streaming handler's state machine.
    /// A large body (<paramref name="body"/> null) waits for its turn before it is read, and gives the turn back here.
    /// </summary>
    private static async Task<(PreparedChat Prepared, bool Stream, bool IncludeUsage, string Model)> PrepareAsync(
        HttpContext context, ServingState state, byte[]? body, CancellationToken cancellation)
    {
        bool large = body is null;
        if (large) await state.LargeBodies.WaitAsync(cancellation);
        try
        {
            body ??= await ReadBodyAsync(context.Request, state.Options.MaxRequestBytes, preallocate: true, cancellation);
            var record = Record(context);
            record?.Received();
            var request = Parse(body, state, record);
            body = null;
            // Before any image is read or fetched.
            ModelsApi.Resolve(state, request.Model);
            var options = new ChatOptions
            {
                ModelId = request.Model,
                // ChatOptions holds floats: a top_p below the smallest float keeps the top token, as float.Epsilon does.
                Temperature = (float?)request.Temperature, TopP = request.TopP is { } p ? Math.Max((float)p, float.Epsilon) : null, TopK = request.TopK,
                MaxOutputTokens = request.MaxNewTokens, Seed = request.Seed, StopSequences = [.. request.Stop],
            };
            if (request.RepetitionPenalty is { } rp) options.AdditionalProperties = new() { ["repetition_penalty"] = rp };
            // The client's own check (max_tokens against the server's limit among them), before any image is read or fetched.
            try { state.Client.SamplingFor(options); }
            catch (InvalidGenerationRequestException e) { throw ApiException.BadRequest(e.Message, e.Param); }
            var messages = await ToMessagesAsync(request, state, cancellation);
            try
            {
                var prepared = state.Client.Prepare(messages, options);
                // The engine reports this request's tokens to its record (the pixels stay owned by the one PreparedChat returned).
                if (record is not null) prepared = new PreparedChat(prepared.Request with { Observer = record }, prepared.Tiles, prepared.StopSequences);
                return (prepared, request.Stream, request.IncludeUsage, request.Model);
            }
            catch (UnknownModelException e) { throw ModelsApi.NotFound(e); }
            catch (InvalidGenerationRequestException e) { throw ApiException.BadRequest(e.Message, e.Param); }
            catch (VlmTuneException e) { throw ApiException.BadRequest(e.Message, "messages"); }
        }
        finally
        {
            if (large) state.LargeBodies.Release();
        }
    }

    /// <summary>Why a request that its client did not abandon was cancelled: the shutdown grace passed, or its timeout.</summary>
    private static ApiException CancelledBy(ServingState state) => state.ShutdownGraceOver.IsCancellationRequested
        ? ServingState.ShuttingDown()
        : new ApiException(504, $"The request took longer than {state.Options.RequestTimeoutSeconds:0.#} s.", null, "timeout", "timeout");

    private static ApiException TooLarge() => new(413, "The request body is larger than this server accepts.", null, "request_too_large");

    /// <summary>
    /// The whole body, at most <paramref name="limit"/> bytes (Kestrel enforces the same limit while it streams in).
    /// Only an admitted request's buffer is sized from its Content-Length up front; before admission memory grows with
    /// the bytes that actually arrive, so headers that promise a body cost nothing.
    /// </summary>
    private static async Task<byte[]> ReadBodyAsync(HttpRequest request, long limit, bool preallocate, CancellationToken cancellation)
    {
        var stream = request.Body;
        if (preallocate && request.ContentLength is { } known)
        {
            var exact = new byte[known];
            try { await stream.ReadExactlyAsync(exact, cancellation); }
            catch (EndOfStreamException) { throw ApiException.BadRequest("The request body ended before its Content-Length."); }
            return exact;
        }
        using var buffer = new MemoryStream();
        var chunk = new byte[16 * 1024];
        int read;
        while ((read = await stream.ReadAsync(chunk, cancellation)) > 0)
        {
            if (buffer.Length + read > limit) throw TooLarge();
            buffer.Write(chunk, 0, read);
        }
        return buffer.ToArray();
    }

    /// <summary>
    /// The body as a request. Invalid UTF-8 anywhere is refused up front (the JSON reader checks it only inside the
    /// strings it is asked to decode); parsing works on the body's own bytes, without a copy. A request naming the
    /// served model is counted under it in /metrics from here on, even when its other fields turn out to be wrong.
    /// </summary>
    private static ChatCompletionRequest Parse(byte[] body, ServingState state, ChatRequestRecord? record)
    {
        if (!System.Text.Unicode.Utf8.IsValid(body)) throw ApiException.BadRequest("The request body is not valid UTF-8.", null, "invalid_json");
        JsonDocument document;
        try { document = JsonDocument.Parse(body.AsMemory(), new JsonDocumentOptions { MaxDepth = 32 }); }
        catch (JsonException) { throw ApiException.BadRequest("The request body is not valid JSON.", null, "invalid_json"); }
        using (document)
        {
            var root = document.RootElement;
            if (record is not null && root.ValueKind == JsonValueKind.Object && root.TryGetProperty("model", out var model)
                && model.ValueKind == JsonValueKind.String && state.Client.ModelIds.FirstOrDefault(id => NamesServedModel(model, id)) is { } served)
                record.Named(served);
            return ChatCompletionRequest.Parse(root);
        }
    }

    /// <summary>Whether a JSON string is a served model's id; one that is no valid text (a lone surrogate escape) is not.</summary>
    private static bool NamesServedModel(JsonElement model, string served)
    {
        try { return model.ValueEquals(served); }
        catch (InvalidOperationException) { return false; }   // ChatCompletionRequest.Parse answers it with a 400 naming "model"
    }

    /// <summary>Messages for the chat client: text as is, every image read from its source into bytes.</summary>
    private static async Task<List<ChatMessage>> ToMessagesAsync(ChatCompletionRequest request, ServingState state, CancellationToken cancellation)
    {
        int images = request.Messages.Sum(m => m.Parts.Count(p => p is ImagePart));
        if (images > state.Options.MaxImagesPerRequest)
            throw ApiException.BadRequest($"The request has {images} images; at most {state.Options.MaxImagesPerRequest} are allowed.", "image_url", "too_many_images");
        var messages = new List<ChatMessage>();
        foreach (var m in request.Messages)
        {
            var contents = new List<AIContent>();
            foreach (var part in m.Parts)
            {
                if (part is string text) contents.Add(new TextContent(text));
                else if (part is ImagePart image)
                {
                    var bytes = await state.Images.ReadAsync(image.Url, cancellation);
                    var data = new DataContent(bytes, "image/*");
                    if (image.Detail is not null) data.AdditionalProperties = new() { ["detail"] = image.Detail };
                    contents.Add(data);
                }
            }
            messages.Add(new ChatMessage(m.Role, contents));
        }
        return messages;
    }

    private static async Task AnswerAsync(HttpContext context, IAsyncEnumerable<ChatChunk> chunks, string id, long created, string model)
    {
        var text = new System.Text.StringBuilder();
        ChatChunk? last = null;
        await foreach (var chunk in chunks)
        {
            text.Append(chunk.Text);
            last = chunk;
        }
        Record(context)?.Count(Finish(last?.FinishReason), 200);
        await TypedResults.Json(new
        {
            id, @object = "chat.completion", created, model,
            choices = new[] { new { index = 0, message = new { role = "assistant", content = text.ToString() }, logprobs = (object?)null, finish_reason = Finish(last?.FinishReason) } },
            usage = Usage(last),
        }).ExecuteAsync(context);
    }

    private static async Task StreamAsync(HttpContext context, ServingState state, bool includeUsage, IAsyncEnumerable<ChatChunk> chunks, string id, long created, string model)
    {
        await using var enumerator = chunks.GetAsyncEnumerator();
        // The first piece comes before any byte is sent, so errors up to the first token still get their status code.
        bool any = await enumerator.MoveNextAsync();
        var response = context.Response;
        response.ContentType = "text/event-stream; charset=utf-8";
        response.Headers.CacheControl = "no-cache";
        response.Headers["X-Accel-Buffering"] = "no";
        await Event(response, Chunk(id, created, model, new { role = "assistant", content = "" }, null));
        ChatChunk? last = null;
        try
        {
            while (any)
            {
                var chunk = enumerator.Current;
                last = chunk;
                if (chunk.Text.Length > 0) await Event(response, Chunk(id, created, model, new { content = chunk.Text }, null));
                any = await enumerator.MoveNextAsync();
            }
        }
        catch (OperationCanceledException) when (!context.RequestAborted.IsCancellationRequested)
        {
            // The request timeout or the shutdown grace passed mid-answer: the status is long sent, so the error travels as an event.
            var error = CancelledBy(state);
            Record(context)?.Count("error", error.Status);
            await Event(response, error.Body);
            return;
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            // A client that went away is counted as cancelled, not as the server's error.
            if (!context.RequestAborted.IsCancellationRequested) Record(context)?.Count("error", 500);
            await Event(response, new ApiException(500, "Generation failed.", null, "internal_error").Body);
            return;
        }
        Record(context)?.Count(Finish(last?.FinishReason), 200);
        await Event(response, Chunk(id, created, model, new { }, Finish(last?.FinishReason)));
        if (includeUsage)
            await Event(response, new { id, @object = "chat.completion.chunk", created, model, choices = Array.Empty<object>(), usage = Usage(last) });
        await response.WriteAsync("data: [DONE]\n\n", context.RequestAborted);
        await response.Body.FlushAsync(context.RequestAborted);
    }

    private static object Chunk(string id, long created, string model, object delta, string? finish) => new
    {
        id, @object = "chat.completion.chunk", created, model,
        choices = new[] { new { index = 0, delta, logprobs = (object?)null, finish_reason = finish } },
    };

    private static async Task Event(HttpResponse response, object payload)
    {
        var json = JsonSerializer.Serialize(payload);
        await response.WriteAsync("data: " + json + "\n\n", response.HttpContext.RequestAborted);
        await response.Body.FlushAsync(response.HttpContext.RequestAborted);
    }

    private static string Finish(FinishReason? reason) => reason == FinishReason.Length ? "length" : "stop";

    private static object Usage(ChatChunk? last)
    {
        int prompt = last?.PromptTokens ?? 0, completion = last?.CompletionTokens ?? 0;
        return new
        {
            prompt_tokens = prompt, completion_tokens = completion, total_tokens = prompt + completion,
            prompt_tokens_details = new { cached_tokens = last?.CachedPromptTokens ?? 0 },
        };
    }
}
