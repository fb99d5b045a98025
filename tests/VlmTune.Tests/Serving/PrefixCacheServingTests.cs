using System.ClientModel;
using System.Text.Json;
using OpenAI;
using OpenAI.Chat;
using VlmTune.Serving;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Serving;

/// <summary>
/// The prefix cache through HTTP: a second question about the same image reuses the first prompt's blocks, reported
/// as usage.prompt_tokens_details.cached_tokens (read by the official OpenAI client) and in /metrics; answers equal a
/// cache-off server's.
/// </summary>
public sealed class PrefixCacheServingTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    private static List<ChatMessage> Messages(string question) =>
    [
        new SystemChatMessage("You are a careful assistant who answers questions about photos in one short sentence."),
        new UserChatMessage(ChatMessageContentPart.CreateImagePart(BinaryData.FromBytes(ServerFixture.Clot), "image/jpeg"), ChatMessageContentPart.CreateTextPart(question)),
    ];

    private static ChatClient OpenAiClient(TestServer server) =>
        new(ServerFixture.ModelId, new ApiKeyCredential("unused"), new OpenAIClientOptions { Endpoint = new Uri(server.Address, "v1") });

    private static readonly ChatCompletionOptions Greedy = new() { Temperature = 0, MaxOutputTokenCount = 6 };

    [FixtureFact]
    public async Task ASecondQuestionAboutTheSameImageReusesThePrefix()
    {
        string[] questions = ["What is in the picture?", "Which colour is the largest object?"];
        string[] expected;
        await using (var off = await fixture.StartAsync(new ServerOptions { PrefixCacheMib = 0 }))
        {
            var client = OpenAiClient(off);
            expected = [.. await Task.WhenAll(questions.Select(async q => (await client.CompleteChatAsync(Messages(q), Greedy)).Value.Content[0].Text))];
            var m = PrometheusExposition.Parse(await off.Http.GetStringAsync("/metrics"));
            Assert.Equal(0, m.Value("vlmtune_prefix_cache_capacity_bytes"));
        }

        await using var server = await fixture.StartAsync(new ServerOptions { PrefixCacheMib = 64 });
        var openAi = OpenAiClient(server);
        ChatCompletion first = await openAi.CompleteChatAsync(Messages(questions[0]), Greedy);
        Assert.Equal(expected[0], first.Content[0].Text);
        Assert.Equal(0, first.Usage.InputTokenDetails.CachedTokenCount);

        ChatCompletion second = await openAi.CompleteChatAsync(Messages(questions[1]), Greedy);
        Assert.Equal(expected[1], second.Content[0].Text);
        int cached = second.Usage.InputTokenDetails.CachedTokenCount;
        // The system prompt and the image's 256 × tiles slots are shared; whole 64-token blocks up to the question.
        Assert.True(cached >= 256 && cached % 64 == 0 && cached < second.Usage.InputTokenCount, $"cached {cached} of {second.Usage.InputTokenCount}");

        var metrics = PrometheusExposition.Parse(await server.Http.GetStringAsync("/metrics"));
        Assert.Equal(1, metrics.Value("vlmtune_prefix_cache_hits_total"));
        Assert.Equal(1, metrics.Value("vlmtune_prefix_cache_misses_total"));
        Assert.Equal(cached, metrics.Value("vlmtune_prefix_cache_reused_tokens_total"));
        Assert.Equal(64 << 20, metrics.Value("vlmtune_prefix_cache_capacity_bytes"));
        Assert.Equal(server.Client.Engine.PrefixCache.Bytes, metrics.Value("vlmtune_prefix_cache_bytes"));
        Assert.True(metrics.Value("vlmtune_prefill_passes_total") >= 2);

        // Streamed: the usage chunk carries it too.
        using var response = await server.PostAsync(new
        {
            model = ServerFixture.ModelId, stream = true, stream_options = new { include_usage = true }, max_tokens = 4, temperature = 0,
            messages = new object[]
            {
                new { role = "system", content = "You are a careful assistant who answers questions about photos in one short sentence." },
                new { role = "user", content = new object[] { new { type = "image_url", image_url = new { url = ServerFixture.DataUrl(ServerFixture.Clot) } }, new { type = "text", text = "Is it daytime?" } } },
            },
        });
        var body = await response.Content.ReadAsStringAsync();
        var usage = body.Split('\n').Where(l => l.StartsWith("data: {")).Select(l => JsonDocument.Parse(l[6..]).RootElement)
            .Last(e => e.TryGetProperty("usage", out var u) && u.ValueKind == JsonValueKind.Object).GetProperty("usage");
        Assert.Equal(cached, usage.GetProperty("prompt_tokens_details").GetProperty("cached_tokens").GetInt32());
    }
}
