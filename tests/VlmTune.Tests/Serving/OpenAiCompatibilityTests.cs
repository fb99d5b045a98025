using System.ClientModel;
using System.Text.Json;
using OpenAI;
using OpenAI.Chat;
using VlmTune.Inference;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Serving;

/// <summary>The official OpenAI .NET client against the server: the golden greedy answers, plain and streamed.</summary>
public sealed class OpenAiCompatibilityTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    private static ChatClient OpenAiClient(TestServer server, string key = "unused") =>
        new(ServerFixture.ModelId, new ApiKeyCredential(key), new OpenAIClientOptions { Endpoint = new Uri(server.Address, "v1") });

    private static List<OpenAI.Chat.ChatMessage> GoldenMessages(string caseName)
    {
        var question = ServerFixture.GoldenQuestion(caseName);
        // The golden case's images, in order, then its question (which may place them with <image> placeholders).
        var parts = Fixtures.Golden.GetProperty("cases").GetProperty(caseName).GetProperty("images") is { ValueKind: JsonValueKind.Array } names
            ? names.EnumerateArray().Select(n => Path.Combine(Fixtures.TinyDir, Fixtures.Golden.GetProperty("images").GetProperty(n.GetString()!).GetProperty("file").GetString()!))
                .Select(file => ChatMessageContentPart.CreateImagePart(BinaryData.FromBytes(File.ReadAllBytes(file)), file.EndsWith(".jpg") ? "image/jpeg" : "image/png")).ToList()
            : [];
        parts.Add(ChatMessageContentPart.CreateTextPart(question));
        return [new UserChatMessage(parts)];
    }

    [FixtureTheory]
    [InlineData("text_only")]
    [InlineData("one_image")]
    [InlineData("two_images")]   // 6720 tokens: past the dynamic-NTK threshold, decoded alone by the engine
    public async Task OpenAiClientGetsTheGoldenGreedyAnswer(string caseName)
    {
        await using var server = await fixture.StartAsync();
        var promptIds = ServerFixture.Golden(caseName, "prompt_ids");
        var greedy = ServerFixture.Golden(caseName, "greedy_ids");
        var expected = fixture.Chat.Tokenizer.Decode(greedy);
        var client = OpenAiClient(server);
        var options = new ChatCompletionOptions { Temperature = 0, MaxOutputTokenCount = greedy.Length };

        ChatCompletion completion = await client.CompleteChatAsync(GoldenMessages(caseName), options);
        Assert.Equal(expected, completion.Content[0].Text);
        Assert.Equal(OpenAI.Chat.ChatFinishReason.Length, completion.FinishReason);
        // The prompt the server built is the official one, token for token in length; the answer is the golden ids.
        Assert.Equal(promptIds.Length, completion.Usage.InputTokenCount);
        Assert.Equal(greedy.Length, completion.Usage.OutputTokenCount);

        var streamed = new System.Text.StringBuilder();
        OpenAI.Chat.ChatFinishReason? finish = null;
        ChatTokenUsage? usage = null;
        int pieces = 0;
        await foreach (var update in client.CompleteChatStreamingAsync(GoldenMessages(caseName), options))
        {
            foreach (var part in update.ContentUpdate) { streamed.Append(part.Text); pieces++; }
            finish ??= update.FinishReason;
            usage ??= update.Usage;
        }
        Assert.Equal(expected, streamed.ToString());
        Assert.True(pieces > 1, "the answer came in one piece: not streamed");
        Assert.Equal(OpenAI.Chat.ChatFinishReason.Length, finish);
        Assert.NotNull(usage);
        Assert.Equal(promptIds.Length, usage!.InputTokenCount);
        Assert.Equal(greedy.Length, usage.OutputTokenCount);
    }

    [FixtureFact]
    public async Task ServerAnswersEqualTheEngineTokenIds()
    {
        // The token ids the engine gives for the server-built prompt decode to the server's text.
        await using var server = await fixture.StartAsync();
        var response = await server.PostAsync(TestServer.UserRequest("Describe this picture.", [ServerFixture.DataUrl(ServerFixture.Clot)], maxTokens: 10));
        using var doc = JsonDocument.Parse(await response.Content.ReadAsStringAsync());
        var text = doc.RootElement.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString();

        using var prepared = server.Client.Prepare([new Microsoft.Extensions.AI.ChatMessage(Microsoft.Extensions.AI.ChatRole.User,
            [new Microsoft.Extensions.AI.DataContent(ServerFixture.Clot, "image/jpeg"), new Microsoft.Extensions.AI.TextContent("Describe this picture.")])],
            new Microsoft.Extensions.AI.ChatOptions { Temperature = 0, MaxOutputTokens = 10 });
        using var features = fixture.Chat.Model.ExtractFeatures(prepared.Request.Pixels!);
        var alone = TokenGenerator.Generate(fixture.Chat.Model, prepared.Request.PromptIds, features, fixture.Chat.Tokenizer.ImgContextId,
            prepared.Request.Sampling, fixture.Chat.StopIds);
        Assert.Equal(fixture.Chat.Tokenizer.Decode(alone.TokenIds), text);
    }

    [FixtureFact]
    public async Task SixteenConcurrentRequestsAnswerAsOneAtATime()
    {
        await using var server = await fixture.StartAsync();
        var image = ServerFixture.DataUrl(ServerFixture.Clot);
        var requests = Enumerable.Range(0, 16).Select(i => TestServer.UserRequest(
            i % 3 == 0 ? $"What is in image {i}?" : $"Question number {i}: tell me about {new string('x', i)}.",
            i % 3 == 0 ? [image] : null, maxTokens: 6 + i % 7)).ToList();

        async Task<string> Ask(object body)
        {
            var response = await server.PostAsync(body);
            var json = await response.Content.ReadAsStringAsync();
            Assert.True(response.IsSuccessStatusCode, json);
            using var doc = JsonDocument.Parse(json);
            return doc.RootElement.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString()!;
        }

        var sequential = new List<string>();
        foreach (var r in requests) sequential.Add(await Ask(r));
        var concurrent = await Task.WhenAll(requests.Select(Ask));
        Assert.Equal(sequential, concurrent);
        Assert.True(server.Client.Engine.Stats.PeakBatch > 1, "the concurrent requests never shared a batch");
    }

    [FixtureFact]
    public async Task StopSequenceEndsTheAnswerWithFinishReasonStop()
    {
        await using var server = await fixture.StartAsync();
        var greedy = ServerFixture.Golden("text_only", "greedy_ids");
        var full = fixture.Chat.Tokenizer.Decode(greedy);
        var stop = full.Substring(full.Length / 2, Math.Min(2, full.Length - full.Length / 2));
        var client = OpenAiClient(server);
        var options = new ChatCompletionOptions { Temperature = 0, MaxOutputTokenCount = greedy.Length };
        options.StopSequences.Add(stop);
        ChatCompletion completion = await client.CompleteChatAsync([new UserChatMessage(ServerFixture.GoldenQuestion("text_only"))], options);
        Assert.Equal(full[..full.IndexOf(stop, StringComparison.Ordinal)], completion.Content[0].Text);
        Assert.Equal(OpenAI.Chat.ChatFinishReason.Stop, completion.FinishReason);
    }

    [FixtureFact]
    public async Task SeededSamplingRepeats()
    {
        await using var server = await fixture.StartAsync();
        var client = OpenAiClient(server);
        var options = new ChatCompletionOptions { Temperature = 1.0f, TopP = 0.9f, MaxOutputTokenCount = 10 };
#pragma warning disable OPENAI001
        options.Seed = 42;
#pragma warning restore OPENAI001
        var a = await client.CompleteChatAsync([new UserChatMessage("Say something random.")], options);
        var b = await client.CompleteChatAsync([new UserChatMessage("Say something random.")], options);
        Assert.Equal(a.Value.Content[0].Text, b.Value.Content[0].Text);
    }

    [FixtureFact]
    public async Task ApiKeyIsRequiredEverywhereButHealthAndThePage()
    {
        await using var server = await fixture.StartAsync(new VlmTune.Serving.ServerOptions { ApiKey = "s3cret" });
        Assert.Equal(200, (int)(await server.Http.GetAsync("/health")).StatusCode);
        Assert.Equal(200, (int)(await server.Http.GetAsync("/")).StatusCode);
        var none = await server.Http.GetAsync("/v1/models");
        await ErrorAssert.IsError(none, 401);
        Assert.Equal("Bearer", none.Headers.WwwAuthenticate.Single().Scheme);
        var wrong = new HttpRequestMessage(HttpMethod.Get, "/v1/models");
        wrong.Headers.Authorization = new("Bearer", "s3cre7");
        await ErrorAssert.IsError(await server.Http.SendAsync(wrong), 401);
        await ErrorAssert.IsError(await server.PostAsync(TestServer.UserRequest("hi", maxTokens: 2)), 401);
        await ErrorAssert.IsError(await server.PostAsync(TestServer.UserRequest("hi", maxTokens: 2), "nope"), 401);

        var right = new HttpRequestMessage(HttpMethod.Get, "/v1/models");
        right.Headers.Authorization = new("Bearer", "s3cret");
        var models = await server.Http.SendAsync(right);
        Assert.Equal(200, (int)models.StatusCode);
        using var doc = JsonDocument.Parse(await models.Content.ReadAsStringAsync());
        Assert.Equal("list", doc.RootElement.GetProperty("object").GetString());
        var model = doc.RootElement.GetProperty("data")[0];
        Assert.Equal(ServerFixture.ModelId, model.GetProperty("id").GetString());
        Assert.Equal("model", model.GetProperty("object").GetString());
        Assert.True(model.TryGetProperty("created", out _) && model.TryGetProperty("owned_by", out _));

        ChatCompletion completion = await OpenAiClient(server, "s3cret").CompleteChatAsync([new UserChatMessage("hi")], new ChatCompletionOptions { MaxOutputTokenCount = 3, Temperature = 0 });
        Assert.Equal(3, completion.Usage.OutputTokenCount);
        var denied = await Assert.ThrowsAsync<ClientResultException>(() => OpenAiClient(server, "wrong").CompleteChatAsync([new UserChatMessage("hi")]));
        Assert.Equal(401, denied.Status);
    }

    [FixtureFact]
    public async Task ManyStreamsCutByTheirClientsLeaveTheServerReady()
    {
        await using var server = await fixture.StartAsync(new VlmTune.Serving.ServerOptions { MaxConcurrentRequests = 256 });
        var body = JsonSerializer.Serialize(TestServer.UserRequest("Tell me a long story.", maxTokens: 2000, stream: true));
        // Half the clients give up at a fixed time, wherever their request is then (queued, in prefill or streaming);
        // the other half wait for their stream to start (generously: a loaded 2-core CI machine prefills 200 requests
        // slowly) and cut it a moment later, so some cuts surely happen mid-stream whatever the machine's speed.
        int streaming = 0, started = 0, cutMidStream = 0;
        async Task Client(bool waitForStream)
        {
            using var cut = new CancellationTokenSource(waitForStream ? TimeSpan.FromSeconds(120) : TimeSpan.FromSeconds(0.5));
            bool midStream = false;
            try
            {
                using var response = await server.PostJsonAsync(body, cancellation: cut.Token);
                Interlocked.Increment(ref streaming);
                await using var stream = await response.Content.ReadAsStreamAsync(cut.Token);
                var buffer = new byte[4096];
                if (waitForStream)
                {
                    Assert.True(await stream.ReadAsync(buffer, cut.Token) > 0);
                    midStream = true;
                    Interlocked.Increment(ref started);
                    cut.CancelAfter(TimeSpan.FromSeconds(0.3));
                }
                while (await stream.ReadAsync(buffer, cut.Token) > 0) { }
            }
            catch (OperationCanceledException) when (midStream) { Interlocked.Increment(ref cutMidStream); }
            catch (OperationCanceledException) { }
            catch (HttpRequestException) { }
            catch (IOException) { }
        }
        await Task.WhenAll(Enumerable.Range(0, 200).Select(i => Client(waitForStream: i % 2 == 0)));
        Assert.True(started == 100, $"only {started} of the 100 waiting clients saw their stream start ({streaming} of 200 got headers)");
        Assert.True(cutMidStream > 1, $"only {cutMidStream} of the 100 started streams were still running when cut");

        // Every cut request leaves the batch and the queue (the engine notices at its next step).
        var engine = server.Client.Engine;
        for (int i = 0; i < 600 && (engine.Stats.Running > 0 || engine.Stats.Queued > 0); i++) await Task.Delay(50);
        Assert.Equal(0, engine.Stats.Running);
        Assert.Equal(0, engine.Stats.Queued);

        var greedy = ServerFixture.Golden("text_only", "greedy_ids");
        ChatCompletion completion = await OpenAiClient(server).CompleteChatAsync([new UserChatMessage(ServerFixture.GoldenQuestion("text_only"))],
            new ChatCompletionOptions { Temperature = 0, MaxOutputTokenCount = greedy.Length });
        Assert.Equal(fixture.Chat.Tokenizer.Decode(greedy), completion.Content[0].Text);
    }
}
