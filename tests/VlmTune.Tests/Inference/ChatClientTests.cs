using Microsoft.Extensions.AI;
using VlmTune.Inference;
using VlmTune.Tests.Serving;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Inference;

/// <summary>The engine as a Microsoft.Extensions.AI chat client: text and DataContent images, plain and streamed.</summary>
public sealed class ChatClientTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    [FixtureTheory]
    [InlineData("text_only")]
    [InlineData("one_image")]
    public async Task ChatClientGivesTheGoldenAnswer(string caseName)
    {
        using var engine = new InferenceEngine(fixture.Chat.Model, fixture.Chat.Tokenizer.ImgContextId);
        IChatClient client = new InternVLChatClient(fixture.Chat, engine);
        var greedy = ServerFixture.Golden(caseName, "greedy_ids");
        var expected = fixture.Chat.Tokenizer.Decode(greedy);
        var contents = new List<AIContent>();
        if (caseName == "one_image") contents.Add(new DataContent(ServerFixture.Clot, "image/jpeg"));
        contents.Add(new TextContent(ServerFixture.GoldenQuestion(caseName)));
        var messages = new List<ChatMessage> { new(ChatRole.User, contents) };
        var options = new ChatOptions { Temperature = 0, MaxOutputTokens = greedy.Length };

        var response = await client.GetResponseAsync(messages, options);
        Assert.Equal(expected, response.Text);
        Assert.Equal(ChatFinishReason.Length, response.FinishReason);
        Assert.Equal(ServerFixture.Golden(caseName, "prompt_ids").Length, response.Usage!.InputTokenCount);
        Assert.Equal(greedy.Length, response.Usage.OutputTokenCount);

        var updates = new List<ChatResponseUpdate>();
        await foreach (var update in client.GetStreamingResponseAsync(messages, options)) updates.Add(update);
        Assert.Equal(expected, string.Concat(updates.Select(u => u.Text)));
        Assert.True(updates.Count > 1);
        Assert.Equal(ChatFinishReason.Length, updates[^1].FinishReason);
        Assert.Single(updates[^1].Contents.OfType<UsageContent>());
        Assert.NotNull(client.GetService<ChatClientMetadata>());
    }

    [FixtureFact]
    public async Task ConversationHistoryAndSystemMessageShapeThePrompt()
    {
        using var engine = new InferenceEngine(fixture.Chat.Model, fixture.Chat.Tokenizer.ImgContextId);
        var client = new InternVLChatClient(fixture.Chat, engine);
        var messages = new List<ChatMessage>
        {
            new(ChatRole.System, "Be brief."),
            new(ChatRole.User, [new DataContent(ServerFixture.Clot, "image/jpeg"), new TextContent("What is this?")]),
            new(ChatRole.Assistant, "A photo."),
            new(ChatRole.User, "Describe it more."),
        };
        using var prepared = client.Prepare(messages, new ChatOptions { MaxOutputTokens = 4 });
        var expected = VlmTune.Text.ChatPrompt.Build(fixture.Chat.Tokenizer, fixture.Chat.Template, "Describe it more.", [1],
            fixture.Chat.Model.Config.NumImageToken, [new VlmTune.Text.ChatTurn("<image>\nWhat is this?", "A photo.")], "Be brief.");
        Assert.Equal(expected.InputIds, prepared.Request.PromptIds);
        Assert.Equal(1, prepared.Request.Pixels!.shape[0]);
        Assert.Equal(4, prepared.Request.Sampling.MaxNewTokens);
    }

    /// <summary>The .NET entry points refuse a bad max tokens through the one check: the client with its limit, the chat API through the engine.</summary>
    [FixtureFact]
    public async Task BadMaxNewTokensIsRefusedByTheOneCheck()
    {
        using var engine = new InferenceEngine(fixture.Chat.Model, fixture.Chat.Tokenizer.ImgContextId);
        IChatClient client = new InternVLChatClient(fixture.Chat, engine, new ChatClientOptions { MaxNewTokensLimit = 5 });
        var e = await Assert.ThrowsAsync<ChatInputException>(() => client.GetResponseAsync([new ChatMessage(ChatRole.User, "hi")], new ChatOptions { MaxOutputTokens = 6 }));
        Assert.Equal(("max_tokens", "max_tokens must be between 1 and 5 (got 6)."), (e.Param, e.Message));

        var chat = Assert.Throws<InvalidGenerationRequestException>(() =>
            fixture.Chat.Chat(new ChatRequest { Question = "hi", Sampling = new SamplingOptions { MaxNewTokens = 0 } }));
        Assert.Equal(("max_tokens", "max_tokens must be ≥ 1 (got 0)."), (chat.Param, chat.Message));
    }

    [Fact]
    public void StopSequencesHoldBackPartialMatches()
    {
        var filter = new StopSequenceFilter(["END", "xyz"]);
        Assert.Equal("hello ", filter.Push("hello E"));
        Assert.Equal("", filter.Push("N"));
        Assert.Equal("EN", filter.Push("x"));          // "x" may begin "xyz"
        Assert.Equal("", filter.Push("y"));
        Assert.Equal("xya", filter.Push("aEND tail"));
        Assert.True(filter.Stopped);
        Assert.Equal("", filter.Flush());
        var open = new StopSequenceFilter(["END"]);
        Assert.Equal("ab", open.Push("abEN"));
        Assert.Equal("EN", open.Flush());
    }
}
