using System.Net.Http.Headers;
using System.Text;
using System.Text.Json;
using Microsoft.AspNetCore.Builder;
using VlmTune.Inference;
using VlmTune.Serving;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Serving;

/// <summary>The tiny model loaded once, as `vlmtune serve` loads it; each test starts its own server (and engine) over it.</summary>
public sealed class ServerFixture : IDisposable
{
    private readonly Lazy<InternVLChat> _chat = new(() => InternVLChat.Load(Fixtures.TinyModel, new ChatLoadOptions()));

    public InternVLChat Chat => _chat.Value;

    public const string ModelId = "tiny";

    public static int[] Golden(string caseName, string field) =>
        Fixtures.Golden.GetProperty("cases").GetProperty(caseName).GetProperty(field).EnumerateArray().Select(e => e.GetInt32()).ToArray();

    public static string GoldenQuestion(string caseName) => Fixtures.Golden.GetProperty("cases").GetProperty(caseName).GetProperty("question").GetString()!;

    public static byte[] Clot => File.ReadAllBytes(Path.Combine(Fixtures.TinyDir, "images", "clot.jpg"));

    public static string DataUrl(byte[] bytes, string type = "image/jpeg") => $"data:{type};base64,{Convert.ToBase64String(bytes)}";

    /// <summary>Starts a server on 127.0.0.1 with a free port and its own engine.</summary>
    public async Task<TestServer> StartAsync(ServerOptions? options = null)
    {
        options = (options ?? new ServerOptions()) with { ModelDir = Fixtures.TinyModel, ModelId = ModelId, Host = "127.0.0.1", Port = 0 };
        var client = VlmTuneServer.CreateChatClient(Chat, options);
        var server = new TestServer(VlmTuneServer.Build(options, client), client);
        await server.StartAsync();
        return server;
    }

    public void Dispose()
    {
        if (_chat.IsValueCreated) _chat.Value.Dispose();
    }
}

/// <summary>A server app with its own engine; <see cref="StartAsync"/> binds it, disposal stops it and the engine.</summary>
public sealed class TestServer(WebApplication app, InternVLChatClient client) : IAsyncDisposable
{
    public Uri Address { get; private set; } = null!;
    public InternVLChatClient Client { get; } = client;
    public IServiceProvider Services => app.Services;
    public HttpClient Http { get; private set; } = null!;

    public async Task StartAsync()
    {
        await app.StartAsync();
        Address = VlmTuneServer.Address(app);
        Http = new HttpClient { BaseAddress = Address, Timeout = TimeSpan.FromMinutes(3) };
    }

    public Task<HttpResponseMessage> PostJsonAsync(string json, string? key = null, CancellationToken cancellation = default)
    {
        var request = new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions") { Content = new StringContent(json, Encoding.UTF8, "application/json") };
        if (key is not null) request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", key);
        return Http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, cancellation);
    }

    public Task<HttpResponseMessage> PostAsync(object body, string? key = null) => PostJsonAsync(JsonSerializer.Serialize(body), key);

    /// <summary>A chat completion POST of raw bytes, with any content type and Host header.</summary>
    public Task<HttpResponseMessage> PostBytesAsync(byte[] body, string contentType = "application/json", string? host = null, CancellationToken cancellation = default)
    {
        var content = new ByteArrayContent(body);
        content.Headers.TryAddWithoutValidation("Content-Type", contentType);
        var request = new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions") { Content = content };
        if (host is not null) request.Headers.Host = host;
        return Http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, cancellation);
    }

    /// <summary>Stops the app as a signal would (ApplicationStopping, then Kestrel's graceful stop).</summary>
    public Task StopAsync() => app.StopAsync();

    /// <summary>The server-sent events of a streamed answer, as their data payloads, up to the end of the body.</summary>
    public static async Task<List<string>> ReadEventsAsync(HttpResponseMessage response, int? take = null)
    {
        var events = new List<string>();
        using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
        while (await reader.ReadLineAsync() is { } line)
        {
            if (line.StartsWith("data: ", StringComparison.Ordinal)) events.Add(line["data: ".Length..]);
            if (take is { } n && events.Count >= n) break;
        }
        return events;
    }

    /// <summary>A one-message request: the text and images (data: or other URLs) of the user.</summary>
    public static object UserRequest(string text, IEnumerable<string>? imageUrls = null, int maxTokens = 12, string model = ServerFixture.ModelId, bool stream = false)
    {
        var parts = (imageUrls ?? []).Select(u => (object)new { type = "image_url", image_url = new { url = u } }).Append(new { type = "text", text }).ToArray();
        return new { model, messages = new[] { new { role = "user", content = parts } }, max_tokens = maxTokens, temperature = 0, stream };
    }

    public async ValueTask DisposeAsync()
    {
        Http?.Dispose();
        await app.StopAsync();
        await app.DisposeAsync();
        Client.Engine.Dispose();
    }
}

/// <summary>Reads an OpenAI error body and checks its shape.</summary>
public static class ErrorAssert
{
    public static async Task<JsonElement> IsError(HttpResponseMessage response, int status, string? param = null)
    {
        var body = await response.Content.ReadAsStringAsync();
        Assert.True((int)response.StatusCode == status, $"expected {status}, got {(int)response.StatusCode}: {body}");
        using var doc = JsonDocument.Parse(body);
        var error = doc.RootElement.GetProperty("error").Clone();
        foreach (var field in new[] { "message", "type", "param", "code" }) Assert.True(error.TryGetProperty(field, out _), $"error without '{field}': {body}");
        var message = error.GetProperty("message").GetString()!;
        Assert.False(string.IsNullOrWhiteSpace(message));
        // Never internal details: no server paths, stack traces or exception names.
        Assert.DoesNotContain("/work/", message);
        Assert.DoesNotContain("/tmp/", message);
        Assert.DoesNotContain("Exception", message);
        Assert.DoesNotContain("   at ", message);
        if (param is not null) Assert.Equal(param, error.GetProperty("param").GetString());
        return error;
    }
}
