using System.Net.Http.Headers;
using System.Text.Json;
using VlmTune.Inference;
using VlmTune.Serving;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Serving;

/// <summary>
/// GET /metrics: valid Prometheus text, counters equal to what the answers' usage says, the end of every request
/// counted by how it ended (a client cut, a bad request), and gauges back at 0 once the server is idle.
/// </summary>
public sealed class MetricsTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    private const string Model = "model=" + ServerFixture.ModelId;

    private static async Task<PrometheusExposition> ScrapeAsync(TestServer server, string? key = null)
    {
        var request = new HttpRequestMessage(HttpMethod.Get, "/metrics");
        if (key is not null) request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", key);
        using var response = await server.Http.SendAsync(request);
        var text = await response.Content.ReadAsStringAsync();
        Assert.True(200 == (int)response.StatusCode, text);
        Assert.Equal("text/plain; version=0.0.4; charset=utf-8", response.Content.Headers.ContentType?.ToString());
        return PrometheusExposition.Parse(text);
    }

    /// <summary>Polls /metrics until <paramref name="condition"/> holds (the server notices a client's cut, or finishes a request, a moment later).</summary>
    private static async Task<PrometheusExposition> ScrapeUntilAsync(TestServer server, Func<PrometheusExposition, bool> condition)
    {
        var metrics = await ScrapeAsync(server);
        for (int i = 0; i < 400 && !condition(metrics); i++)
        {
            await Task.Delay(25);
            metrics = await ScrapeAsync(server);
        }
        return metrics;
    }

    private static bool Idle(PrometheusExposition m) =>
        new[] { "vlmtune_requests_running", "vlmtune_requests_waiting", "vlmtune_http_requests_in_flight", "vlmtune_decode_batch_size", "vlmtune_kv_cache_used_tokens" }
            .All(g => m.Value(g) == 0);

    private static void AssertIdle(PrometheusExposition m)
    {
        foreach (var g in new[] { "vlmtune_requests_running", "vlmtune_requests_waiting", "vlmtune_http_requests_in_flight", "vlmtune_decode_batch_size", "vlmtune_kv_cache_used_tokens", "vlmtune_kv_cache_usage_ratio" })
            Assert.True(m.Value(g) == 0, $"{g} is {m.Value(g)} while the server is idle");
    }

    /// <summary>An answer's usage and finish reason, plain or streamed (with include_usage).</summary>
    private static async Task<(int Prompt, int Completion, string Finish)> AnswerAsync(TestServer server, string text, int maxTokens, string[]? images = null, bool stream = false)
    {
        var parts = (images ?? []).Select(u => (object)new { type = "image_url", image_url = new { url = u } }).Append(new { type = "text", text }).ToArray();
        object body = stream
            ? new { model = ServerFixture.ModelId, messages = new[] { new { role = "user", content = parts } }, max_tokens = maxTokens, temperature = 0, stream, stream_options = new { include_usage = true } }
            : new { model = ServerFixture.ModelId, messages = new[] { new { role = "user", content = parts } }, max_tokens = maxTokens, temperature = 0 };
        using var response = await server.PostAsync(body);
        Assert.Equal(200, (int)response.StatusCode);
        if (!stream)
        {
            using var doc = JsonDocument.Parse(await response.Content.ReadAsStringAsync());
            var usage = doc.RootElement.GetProperty("usage");
            return (usage.GetProperty("prompt_tokens").GetInt32(), usage.GetProperty("completion_tokens").GetInt32(),
                doc.RootElement.GetProperty("choices")[0].GetProperty("finish_reason").GetString()!);
        }
        var events = await TestServer.ReadEventsAsync(response);
        Assert.Equal("[DONE]", events[^1]);
        using var last = JsonDocument.Parse(events[^2]);
        using var finish = JsonDocument.Parse(events[^3]);
        var u = last.RootElement.GetProperty("usage");
        return (u.GetProperty("prompt_tokens").GetInt32(), u.GetProperty("completion_tokens").GetInt32(),
            finish.RootElement.GetProperty("choices")[0].GetProperty("finish_reason").GetString()!);
    }

    [FixtureFact]
    public async Task MetricsAreValidExpositionAndCountersNeverDecrease()
    {
        await using var server = await fixture.StartAsync();
        var first = await ScrapeAsync(server);
        var expected = new Dictionary<string, string>
        {
            ["vlmtune_requests_total"] = "counter", ["vlmtune_prompt_tokens_total"] = "counter", ["vlmtune_generation_tokens_total"] = "counter",
            ["vlmtune_image_tiles_total"] = "counter", ["vlmtune_requests_running"] = "gauge", ["vlmtune_requests_waiting"] = "gauge",
            ["vlmtune_http_requests_in_flight"] = "gauge", ["vlmtune_decode_batch_size"] = "gauge", ["vlmtune_decode_step_batch_size"] = "histogram",
            ["vlmtune_kv_cache_used_tokens"] = "gauge", ["vlmtune_kv_cache_capacity_tokens"] = "gauge", ["vlmtune_kv_cache_usage_ratio"] = "gauge",
            ["vlmtune_time_to_first_token_seconds"] = "histogram", ["vlmtune_time_per_output_token_seconds"] = "histogram",
            ["vlmtune_e2e_request_latency_seconds"] = "histogram", ["vlmtune_request_queue_time_seconds"] = "histogram",
        };
        foreach (var (name, type) in expected)
        {
            Assert.True(first.Families.TryGetValue(name, out var family), $"/metrics has no {name}");
            Assert.Equal(type, family!.Type);
            Assert.False(string.IsNullOrWhiteSpace(family.Help), $"{name} has no help");
        }
        foreach (var family in first.Families.Values)
        {
            Assert.StartsWith("vlmtune_", family.Name);
            if (family.Type == "counter") Assert.EndsWith("_total", family.Name);
        }
        // The served model's series exist from the start, at 0; so does the histogram of every per-model latency.
        Assert.Equal(0, first.Value("vlmtune_requests_total", Model, "finish_reason=stop", "status=200"));
        Assert.Equal(0, first.Value("vlmtune_requests_total", Model, "finish_reason=cancelled", "status=499"));
        Assert.Equal(0, first.Value("vlmtune_time_to_first_token_seconds_count", Model));
        Assert.Equal(server.Client.Engine.Options.MaxCacheTokens, first.Value("vlmtune_kv_cache_capacity_tokens"));
        AssertIdle(first);

        await AnswerAsync(server, "hello", maxTokens: 6);
        await AnswerAsync(server, "hello again", maxTokens: 4, stream: true);
        await ErrorAssert.IsError(await server.PostJsonAsync("{\"model\":"), 400);
        var second = await ScrapeAsync(server);
        var third = await ScrapeAsync(server);
        PrometheusExposition.AssertNeverDecreases(first, second);
        PrometheusExposition.AssertNeverDecreases(second, third);
        Assert.True(second.Value("vlmtune_generation_tokens_total", Model) > 0);
        Assert.True(second.Value("vlmtune_decode_step_batch_size_count") > 0);
    }

    [FixtureFact]
    public async Task CountersEqualWhatTheAnswersUsageSays()
    {
        await using var server = await fixture.StartAsync();
        var answers = new List<(int Prompt, int Completion, string Finish)>
        {
            await AnswerAsync(server, "Tell me a joke.", maxTokens: 12),
            await AnswerAsync(server, "What is in the picture?", maxTokens: 5, images: [ServerFixture.DataUrl(ServerFixture.Clot)]),
            await AnswerAsync(server, "And another one.", maxTokens: 9, stream: true),
        };
        using var clot = fixture.Chat.Images.Process(ServerFixture.Clot, "clot");
        var m = await ScrapeAsync(server);

        Assert.Equal(answers.Sum(a => a.Prompt), m.Value("vlmtune_prompt_tokens_total", Model));
        Assert.Equal(answers.Sum(a => a.Completion), m.Value("vlmtune_generation_tokens_total", Model));
        Assert.Equal(clot.TileCount, m.Value("vlmtune_image_tiles_total", Model));
        foreach (var reason in new[] { "stop", "length" })
            Assert.Equal(answers.Count(a => a.Finish == reason), m.Value("vlmtune_requests_total", Model, $"finish_reason={reason}", "status=200"));
        Assert.Equal(answers.Count, m.Sum("vlmtune_requests_total"));

        // One first token per answer that has one, one interval per later token; one latency per answer.
        Assert.Equal(answers.Count(a => a.Completion > 0), m.Value("vlmtune_time_to_first_token_seconds_count", Model));
        Assert.Equal(answers.Sum(a => Math.Max(a.Completion - 1, 0)), m.Value("vlmtune_time_per_output_token_seconds_count", Model));
        Assert.Equal(answers.Count, m.Value("vlmtune_e2e_request_latency_seconds_count", Model));
        Assert.Equal(answers.Count, m.Value("vlmtune_request_queue_time_seconds_count", Model));

        // The prefill gives the first token; each decode step one more, and one for a stop id (not part of the answer).
        // So the steps' batch sizes add up to this however the engine batched the requests.
        int sequenceSteps = answers.Sum(a => a.Finish == "stop" ? a.Completion : a.Completion - 1);
        Assert.Equal(sequenceSteps, m.Value("vlmtune_decode_step_batch_size_sum"));
        Assert.Equal(server.Client.Engine.Stats.Steps, m.Value("vlmtune_decode_step_batch_size_count"));
        AssertIdle(await ScrapeUntilAsync(server, Idle));
    }

    /// <summary>
    /// With one batch slot taken by a request that runs until it is cancelled, a second one waits: the gauges show
    /// both. Once it streams, its client cuts it: counted as cancelled (with its prompt and tokens), and every gauge
    /// goes back to 0.
    /// </summary>
    [FixtureFact]
    public async Task ACutStreamCountsAsCancelledAndTheGaugesReturnToZero()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { MaxBatch = 1 });
        var engine = server.Client.Engine;
        var prompt = ServerFixture.Golden("text_only", "prompt_ids");
        using var holdCancel = new CancellationTokenSource();
        // No stop ids and the whole context to fill: it ends only when cancelled.
        var hold = engine.Submit(new GenerationRequest { PromptIds = prompt, Sampling = new SamplingOptions { MaxNewTokens = engine.ContextLimit - prompt.Length } }, holdCancel.Token);
        int read = 0;
        await foreach (var _ in hold.ReadTokensAsync()) if (++read == 2) break;   // the second token comes from a decode step

        using var cut = new CancellationTokenSource();
        const string question = "Write a long story.";
        var body = JsonSerializer.Serialize(new { model = ServerFixture.ModelId, messages = new[] { new { role = "user", content = question } }, max_tokens = 2000, temperature = 0, stream = true });
        var posting = server.PostJsonAsync(body, cancellation: cut.Token);
        var busy = await ScrapeUntilAsync(server, m => m.Value("vlmtune_requests_waiting") == 1);
        Assert.Equal(1, busy.Value("vlmtune_requests_waiting"));
        Assert.Equal(1, busy.Value("vlmtune_requests_running"));
        Assert.Equal(1, busy.Value("vlmtune_decode_batch_size"));
        Assert.Equal(1, busy.Value("vlmtune_http_requests_in_flight"));
        double used = busy.Value("vlmtune_kv_cache_used_tokens");
        Assert.True(used >= prompt.Length + 2, $"the running request's cache holds {used} slots");
        Assert.Equal(used / engine.Options.MaxCacheTokens, busy.Value("vlmtune_kv_cache_usage_ratio"), 1e-12);

        holdCancel.Cancel();
        var events = new List<string>();
        using (var response = await posting)
        {
            Assert.Equal(200, (int)response.StatusCode);
            using var reader = new StreamReader(await response.Content.ReadAsStreamAsync(cut.Token));
            while (events.Count < 3 && await reader.ReadLineAsync(cut.Token) is { } line)
                if (line.StartsWith("data: ", StringComparison.Ordinal)) events.Add(line[6..]);
            Assert.True(events.Count == 3 && !events.Contains("[DONE]"), "the answer ended before its client cut it: " + string.Join(" | ", events));
            cut.Cancel();
        }
        var m = await ScrapeUntilAsync(server, m => m.Value("vlmtune_requests_total", Model, "finish_reason=cancelled", "status=499") == 1 && Idle(m));
        Assert.Equal(1, m.Value("vlmtune_requests_total", Model, "finish_reason=cancelled", "status=499"));
        Assert.Equal(1, m.Sum("vlmtune_requests_total"));
        AssertIdle(m);
        // The cut request's prompt went through the model, and at least the tokens its client read were generated.
        using var prepared = server.Client.Prepare([new Microsoft.Extensions.AI.ChatMessage(Microsoft.Extensions.AI.ChatRole.User, question)]);
        Assert.Equal(prepared.Request.PromptIds.Count, m.Value("vlmtune_prompt_tokens_total", Model));
        Assert.True(m.Value("vlmtune_generation_tokens_total", Model) >= 2);
        Assert.Equal(0, m.Value("vlmtune_e2e_request_latency_seconds_count", Model));
    }

    [FixtureFact]
    public async Task BadRequestsCountAsErrorsAndTouchNoTokens()
    {
        await using var server = await fixture.StartAsync();
        await ErrorAssert.IsError(await server.PostJsonAsync(JsonSerializer.Serialize(new { model = ServerFixture.ModelId, messages = new[] { new { role = "user", content = "hi" } }, temperature = 5 })), 400, "temperature");
        await ErrorAssert.IsError(await server.PostAsync(TestServer.UserRequest("look", [ServerFixture.DataUrl([1, 2, 3, 4])])), 400, "image_url");
        await ErrorAssert.IsError(await server.PostJsonAsync("{\"model\": \"tiny\", \"messages\": "), 400);
        await ErrorAssert.IsError(await server.PostJsonAsync("""{"model":"ti\ud800ny","messages":[{"role":"user","content":"a"}]}"""), 400, "model");
        await ErrorAssert.IsError(await server.PostAsync(TestServer.UserRequest("hi", model: "no-such-model")), 404, "model");
        var m = await ScrapeAsync(server);

        // The model label is the served model the request named (its other fields may be wrong), "" when it named none:
        // arbitrary names never become series.
        Assert.Equal(2, m.Value("vlmtune_requests_total", Model, "finish_reason=error", "status=400"));
        Assert.Equal(2, m.Value("vlmtune_requests_total", "model=", "finish_reason=error", "status=400"));
        Assert.Equal(1, m.Value("vlmtune_requests_total", "model=", "finish_reason=error", "status=404"));
        Assert.Equal(5, m.Sum("vlmtune_requests_total"));
        foreach (var counter in new[] { "vlmtune_prompt_tokens_total", "vlmtune_generation_tokens_total", "vlmtune_image_tiles_total" })
            Assert.Equal(0, m.Sum(counter));
        foreach (var histogram in new[] { "vlmtune_time_to_first_token_seconds_count", "vlmtune_e2e_request_latency_seconds_count", "vlmtune_request_queue_time_seconds_count", "vlmtune_decode_step_batch_size_count" })
            Assert.Equal(0, m.Sum(histogram));
        AssertIdle(await ScrapeUntilAsync(server, Idle));
    }

    /// <summary>With --api-key, /metrics needs the key like every endpoint but /health; refused requests are counted too.</summary>
    [FixtureFact]
    public async Task MetricsNeedTheApiKeyWhenOneIsSet()
    {
        const string key = "scrape-key";
        await using var server = await fixture.StartAsync(new ServerOptions { ApiKey = key });
        await ErrorAssert.IsError(await server.Http.GetAsync("/metrics"), 401);
        var wrong = new HttpRequestMessage(HttpMethod.Get, "/metrics");
        wrong.Headers.Authorization = new AuthenticationHeaderValue("Bearer", "not-it");
        await ErrorAssert.IsError(await server.Http.SendAsync(wrong), 401);
        await ErrorAssert.IsError(await server.PostAsync(TestServer.UserRequest("hi")), 401);

        var m = await ScrapeAsync(server, key);
        Assert.Equal(1, m.Value("vlmtune_requests_total", "model=", "finish_reason=error", "status=401"));
        Assert.Equal(1, m.Sum("vlmtune_requests_total"));
    }
}
