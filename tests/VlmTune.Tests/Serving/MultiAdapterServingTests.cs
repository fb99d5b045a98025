using System.ClientModel;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json;
using OpenAI;
using OpenAI.Chat;
using VlmTune.Inference;
using VlmTune.Serving;
using VlmTune.Tests.Inference;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Serving;

/// <summary>Several fine-tunes on one server: model ids pick adapters, /v1/models lists them, admin routes load and unload.</summary>
[Collection(MultiAdapterCollection.Name)]
public sealed class MultiAdapterServingTests(MultiAdapterFixture f, ServerFixture fixture) : IClassFixture<ServerFixture>
{
    private const string Key = "admin-key";
    private static readonly string Question = ServerFixture.GoldenQuestion("text_only");

    private string[] Named => [$"alpha={f.Alpha}", $"beta={f.Beta}"];

    /// <summary>The server's answer for the golden question: the model's 12 greedy tokens, cut at a stop id.</summary>
    private string Expected(string? adapterDir) =>
        fixture.Chat.Tokenizer.Decode(f.Merged[(adapterDir, false)].TakeWhile(id => !fixture.Chat.StopIds.Contains(id)).ToArray());

    private static ChatClient OpenAi(TestServer server, string model, string key = "unused") =>
        new(model, new ApiKeyCredential(key), new OpenAIClientOptions { Endpoint = new Uri(server.Address, "v1") });

    private static Task<HttpResponseMessage> SendAsync(TestServer server, HttpMethod method, string path, object? body = null, string? key = null)
    {
        var request = new HttpRequestMessage(method, path);
        if (body is not null) request.Content = new StringContent(JsonSerializer.Serialize(body), Encoding.UTF8, "application/json");
        if (key is not null) request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", key);
        return server.Http.SendAsync(request);
    }

    private static async Task<string> AnswerAsync(TestServer server, string model, string? key = null)
    {
        var response = await server.PostAsync(TestServer.UserRequest(Question, maxTokens: 12, model: model), key);
        var body = await response.Content.ReadAsStringAsync();
        Assert.True(response.IsSuccessStatusCode, body);
        using var doc = JsonDocument.Parse(body);
        Assert.Equal(model, doc.RootElement.GetProperty("model").GetString());
        return doc.RootElement.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString()!;
    }

    private static async Task<string[]> ModelIdsAsync(TestServer server, string? key = null)
    {
        var response = await SendAsync(server, HttpMethod.Get, "/v1/models", key: key);
        using var doc = JsonDocument.Parse(await response.Content.ReadAsStringAsync());
        return doc.RootElement.GetProperty("data").EnumerateArray().Select(m => m.GetProperty("id").GetString()!).ToArray();
    }

    [FixtureFact]
    public async Task TheOpenAiClientPicksEachAdapterByModelName()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { Adapters = Named });
        var options = new ChatCompletionOptions { Temperature = 0, MaxOutputTokenCount = 12 };
        var models = new (string Id, string? Dir)[] { ("alpha", f.Alpha), (ServerFixture.ModelId, null), ("beta", f.Beta) };
        // Concurrently: the engine batches them (MultiAdapterEngineTests checks that they share a step and still equal their solo answers).
        var completions = await Task.WhenAll(models.Select(m => OpenAi(server, m.Id).CompleteChatAsync([new UserChatMessage(Question)], options)));
        for (int i = 0; i < models.Length; i++)
        {
            Assert.Equal(Expected(models[i].Dir), completions[i].Value.Content[0].Text);
            Assert.Equal(models[i].Id, completions[i].Value.Model);
        }
        Assert.Equal(3, new HashSet<string>(models.Select(m => Expected(m.Dir))).Count);   // three different answers

        // Streamed too, and by plain HTTP.
        var streamed = new StringBuilder();
        await foreach (var update in OpenAi(server, "beta").CompleteChatStreamingAsync([new UserChatMessage(Question)], options))
            foreach (var part in update.ContentUpdate) streamed.Append(part.Text);
        Assert.Equal(Expected(f.Beta), streamed.ToString());
        Assert.Equal(Expected(f.Alpha), await AnswerAsync(server, "alpha"));

        var unknown = await Assert.ThrowsAsync<ClientResultException>(() => OpenAi(server, "gamma").CompleteChatAsync([new UserChatMessage(Question)], options));
        Assert.Equal(404, unknown.Status);
    }

    [FixtureFact]
    public async Task MetricsCountEachAdaptersRequestsUnderItsModelId()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { Adapters = Named });
        await AnswerAsync(server, "alpha");
        await AnswerAsync(server, "alpha");
        await AnswerAsync(server, "beta");
        var metrics = await server.Http.GetStringAsync("/metrics");
        double Requests(string model) => metrics.Split('\n')
            .Where(l => l.StartsWith("vlmtune_requests_total{", StringComparison.Ordinal) && l.Contains($"model=\"{model}\"", StringComparison.Ordinal))
            .Sum(l => double.Parse(l[(l.LastIndexOf(' ') + 1)..], System.Globalization.CultureInfo.InvariantCulture));
        Assert.Equal(2, Requests("alpha"));
        Assert.Equal(1, Requests("beta"));
        Assert.Equal(0, Requests(ServerFixture.ModelId));
    }

    [FixtureFact]
    public async Task ModelsListsTheBaseAndEveryAdapter()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { Adapters = Named });
        var response = await SendAsync(server, HttpMethod.Get, "/v1/models");
        using (var doc = JsonDocument.Parse(await response.Content.ReadAsStringAsync()))
        {
            var data = doc.RootElement.GetProperty("data").EnumerateArray().ToList();
            Assert.Equal([ServerFixture.ModelId, "alpha", "beta"], data.Select(m => m.GetProperty("id").GetString()));
            Assert.All(data, m => Assert.Equal("model", m.GetProperty("object").GetString()));
            Assert.False(data[0].TryGetProperty("parent", out _));
            Assert.Equal(ServerFixture.ModelId, data[2].GetProperty("parent").GetString());
        }
        var beta = await server.Http.GetAsync("/v1/models/beta");
        Assert.Equal(200, (int)beta.StatusCode);
        using (var doc = JsonDocument.Parse(await beta.Content.ReadAsStringAsync())) Assert.Equal("beta", doc.RootElement.GetProperty("id").GetString());
        var error = await ErrorAssert.IsError(await server.Http.GetAsync("/v1/models/gamma"), 404, "model");
        Assert.Equal("model_not_found", error.GetProperty("code").GetString());
    }

    [FixtureFact]
    public async Task AnUnknownModelIsA404NamingIt()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { Adapters = Named });
        var error = await ErrorAssert.IsError(await server.PostAsync(TestServer.UserRequest(Question, model: "gamma")), 404, "model");
        Assert.Equal("model_not_found", error.GetProperty("code").GetString());
        var message = error.GetProperty("message").GetString()!;
        Assert.Contains("'gamma'", message);
        Assert.Contains("'alpha'", message);   // and says what is served
    }

    [FixtureFact]
    public async Task AdminRoutesLoadAndUnloadBehindTheApiKey()
    {
        var projector = AdapterFolders.WithTrainedProjector(f.Alpha, Path.Combine(f.Dir, "http-with-projector"));
        await using var server = await fixture.StartAsync(new ServerOptions { ApiKey = Key, AllowAdapterLoading = f.Dir, Adapters = [$"alpha={f.Alpha}"] });
        var gamma = new { name = "gamma", path = "beta" };   // relative to --allow-adapter-loading

        await ErrorAssert.IsError(await SendAsync(server, HttpMethod.Post, "/v1/adapters", gamma), 401);
        await ErrorAssert.IsError(await SendAsync(server, HttpMethod.Post, "/v1/adapters", gamma, "wrong"), 401);
        Assert.DoesNotContain("gamma", await ModelIdsAsync(server, Key));

        var loaded = await SendAsync(server, HttpMethod.Post, "/v1/adapters", gamma, Key);
        Assert.True(loaded.IsSuccessStatusCode, await loaded.Content.ReadAsStringAsync());
        Assert.Equal([ServerFixture.ModelId, "alpha", "gamma"], await ModelIdsAsync(server, Key));
        Assert.Equal(Expected(f.Beta), await AnswerAsync(server, "gamma", Key));

        // Conflicts, bad names and paths, adapters that cannot share the base: one line each, naming the field.
        Assert.Equal("adapter_exists", (await ErrorAssert.IsError(await SendAsync(server, HttpMethod.Post, "/v1/adapters", gamma, Key), 409, "name")).GetProperty("code").GetString());
        await ErrorAssert.IsError(await SendAsync(server, HttpMethod.Post, "/v1/adapters", new { name = ServerFixture.ModelId, path = "beta" }, Key), 409, "name");
        await ErrorAssert.IsError(await SendAsync(server, HttpMethod.Post, "/v1/adapters", new { name = "no spaces", path = "beta" }, Key), 400, "name");
        await ErrorAssert.IsError(await SendAsync(server, HttpMethod.Post, "/v1/adapters", new { name = "delta" }, Key), 400, "path");
        foreach (var outside in new[] { "missing", "..", Fixtures.TinyDir })
            await ErrorAssert.IsError(await SendAsync(server, HttpMethod.Post, "/v1/adapters", new { name = "delta", path = outside }, Key), 400, "path");
        var refused = await ErrorAssert.IsError(await SendAsync(server, HttpMethod.Post, "/v1/adapters", new { name = "delta", path = Path.GetFileName(projector) }, Key), 400, "path");
        Assert.Contains("trainable.safetensors", refused.GetProperty("message").GetString());
        Assert.DoesNotContain("delta", await ModelIdsAsync(server, Key));

        // Unloading while a request for it streams: the request ends as it would have, new ones get 404.
        var streaming = await server.PostAsync(TestServer.UserRequest(Question, maxTokens: 12, model: "gamma", stream: true), Key);
        var events = TestServer.ReadEventsAsync(streaming);
        await ErrorAssert.IsError(await SendAsync(server, HttpMethod.Delete, "/v1/adapters/gamma"), 401);
        var deleted = await SendAsync(server, HttpMethod.Delete, "/v1/adapters/gamma", key: Key);
        Assert.Equal(200, (int)deleted.StatusCode);
        using (var doc = JsonDocument.Parse(await deleted.Content.ReadAsStringAsync())) Assert.True(doc.RootElement.GetProperty("deleted").GetBoolean());
        var text = string.Concat((await events).Where(e => e != "[DONE]").Select(e => JsonDocument.Parse(e).RootElement)
            .Where(e => e.TryGetProperty("choices", out var c) && c.GetArrayLength() > 0 && c[0].GetProperty("delta").TryGetProperty("content", out _))
            .Select(e => e.GetProperty("choices")[0].GetProperty("delta").GetProperty("content").GetString()));
        Assert.Equal(Expected(f.Beta), text);
        await ErrorAssert.IsError(await server.PostAsync(TestServer.UserRequest(Question, model: "gamma"), Key), 404, "model");
        Assert.Equal([ServerFixture.ModelId, "alpha"], await ModelIdsAsync(server, Key));

        await ErrorAssert.IsError(await SendAsync(server, HttpMethod.Delete, "/v1/adapters/gamma", key: Key), 404, "model");
        await ErrorAssert.IsError(await SendAsync(server, HttpMethod.Delete, $"/v1/adapters/{ServerFixture.ModelId}", key: Key), 400, "name");
        // The adapters given at start-up unload the same way; the base answers on.
        Assert.Equal(200, (int)(await SendAsync(server, HttpMethod.Delete, "/v1/adapters/alpha", key: Key)).StatusCode);
        Assert.Equal(Expected(null), await AnswerAsync(server, ServerFixture.ModelId, Key));
    }

    [FixtureFact]
    public async Task AdminRoutesAreOffUnlessAllowed()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { Adapters = Named, ApiKey = Key });
        var error = await ErrorAssert.IsError(await SendAsync(server, HttpMethod.Post, "/v1/adapters", new { name = "gamma", path = f.Beta }, Key), 403);
        Assert.Equal("adapter_loading_disabled", error.GetProperty("code").GetString());
        await ErrorAssert.IsError(await SendAsync(server, HttpMethod.Delete, "/v1/adapters/beta", key: Key), 403);
        Assert.Equal([ServerFixture.ModelId, "alpha", "beta"], await ModelIdsAsync(server, Key));
    }

    /// <summary>Bad --adapter values and combinations: each a line naming the option and the value.</summary>
    [FixtureFact]
    public void BadAdapterOptionsAreNamed()
    {
        static List<string> Problems(ServerOptions o) => (o with { ModelDir = Fixtures.TinyModel }).Validate().ToList();
        Assert.Empty(Problems(new ServerOptions { Adapters = [$"alpha={Fixtures.Adapter}", $"a.b-c:1_2={Fixtures.Adapter}"] }));

        var bad = Problems(new ServerOptions { Adapters = [$"bad name={Fixtures.Adapter}", $"={Fixtures.Adapter}", "gone=/nonexistent/adapter", $"twice={Fixtures.Adapter}", $"twice={Fixtures.Adapter}", $"model={Fixtures.Adapter}", "empty="] });
        Assert.Contains(bad, p => p.StartsWith("--adapter bad name=") && p.Contains("not a model name"));
        Assert.Contains(bad, p => p.StartsWith("--adapter =") && p.Contains("not a model name"));
        Assert.Contains(bad, p => p == "--adapter gone=/nonexistent/adapter: folder not found.");
        Assert.Contains(bad, p => p.StartsWith("--adapter twice:") && p.Contains("given twice"));
        Assert.Contains(bad, p => p.StartsWith("--adapter model:") && p.Contains("base model's id"));   // the tiny model folder is called "model"
        Assert.Contains(bad, p => p == "--adapter empty=: the path is empty.");
        Assert.All(bad, p => Assert.DoesNotContain("\n", p));

        Assert.Contains(Problems(new ServerOptions { AdapterDir = Fixtures.Adapter, Adapters = [$"alpha={Fixtures.Adapter}"] }), p => p.Contains("cannot be combined"));
        Assert.Contains(Problems(new ServerOptions { AllowAdapterLoading = f.Dir }), p => p.StartsWith("--allow-adapter-loading needs --api-key"));
        Assert.Contains(Problems(new ServerOptions { AllowAdapterLoading = "/nonexistent/root", ApiKey = Key }), p => p.StartsWith("--allow-adapter-loading /nonexistent/root: folder not found"));
    }

    /// <summary>A bare path stays the one merged model; NAME=PATH is told apart by the '=' before any '/'.</summary>
    [Theory]
    [InlineData("alpha=/some/dir", true)]
    [InlineData("work_dirs/lr=1e-4/iter_10", false)]
    [InlineData("./lr=1e-4", false)]
    [InlineData("/abs/adapter", false)]
    [InlineData("name=rel/path=x", true)]
    public void NamedAndBareAdapterValues(string value, bool named) => Assert.Equal(named, ServerOptions.IsNamedAdapter(value));

    /// <summary>An adapter that cannot be loaded at start-up stops the server before it serves, naming the --adapter value.</summary>
    [FixtureFact]
    public void AnAdapterThatDoesNotLoadStopsStartUp()
    {
        var options = new ServerOptions { ModelDir = Fixtures.TinyModel, ModelId = ServerFixture.ModelId, Adapters = [$"alpha={Fixtures.Adapter}", $"nothing={f.Dir}"] };
        var e = Assert.Throws<VlmTuneException>(() => VlmTuneServer.CreateChatClient(fixture.Chat, options));
        Assert.StartsWith($"--adapter nothing={f.Dir}: ", e.Message);
    }
}
