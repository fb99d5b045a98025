using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using VlmTune.Serving;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Serving;

/// <summary>
/// What one client sends never harms another: hostile sampling values, broken text, cross-site and rebinding
/// requests, huge or silent bodies, disconnects and shutdown each end only their own request, cleanly.
/// </summary>
public sealed class ReliabilityTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    /// <summary>A one-message request, greedy unless <paramref name="extra"/> (more JSON members) sets a temperature.</summary>
    private static string Body(string text = "hello", int maxTokens = 12, bool stream = false, string? extra = null)
    {
        var json = JsonSerializer.Serialize(new { model = ServerFixture.ModelId, messages = new[] { new { role = "user", content = text } }, max_tokens = maxTokens, stream });
        if (extra?.Contains("\"temperature\"") != true) extra = extra is null ? "\"temperature\": 0" : extra + ", \"temperature\": 0";
        return json[..^1] + ", " + extra + "}";
    }

    /// <summary>A streamed answer read to its end: its events' payloads.</summary>
    private static async Task<List<string>> StreamAsync(TestServer server, string body)
    {
        using var response = await server.PostJsonAsync(body);
        Assert.Equal(200, (int)response.StatusCode);
        return await TestServer.ReadEventsAsync(response);
    }

    private static string Content(string json)
    {
        using var doc = JsonDocument.Parse(json);
        return doc.RootElement.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString()!;
    }

    private static async Task<bool> EventuallyAsync(Func<bool> condition)
    {
        for (int i = 0; i < 400 && !condition(); i++) await Task.Delay(25);
        return condition();
    }

    [FixtureFact]
    public async Task HostileSamplingValuesNeverHarmOtherStreams()
    {
        await using var server = await fixture.StartAsync();
        var good = Enumerable.Range(0, 3).Select(i => StreamAsync(server, Body($"story {i}", maxTokens: 80, stream: true))).ToList();
        // A tiny temperature is inside OpenAI's range [0, 2]: it is answered, greedily (fp32 cannot divide by 5e-39).
        var greedy = Content(await (await server.PostJsonAsync(Body("tiny", maxTokens: 16))).Content.ReadAsStringAsync());
        foreach (var t in new[] { "5e-39", "1e-300", "4.9e-324" })
        {
            var response = await server.PostJsonAsync(Body("tiny", maxTokens: 16, extra: $"\"temperature\": {t}, \"top_p\": 1e-300, \"seed\": 3"));
            Assert.Equal(200, (int)response.StatusCode);
            Assert.Equal(greedy, Content(await response.Content.ReadAsStringAsync()));
        }
        // A repetition penalty that is 0 or inf in fp32 is refused, naming the field.
        foreach (var p in new[] { "1e-300", "1e300", "0.0001" })
            await ErrorAssert.IsError(await server.PostJsonAsync(Body(extra: $"\"repetition_penalty\": {p}, \"temperature\": 0.7")), 400, "repetition_penalty");
        await ErrorAssert.IsError(await server.PostJsonAsync(Body(extra: "\"temperature\": 1e400")), 400, "temperature");
        foreach (var events in await Task.WhenAll(good)) Assert.Equal("[DONE]", events[^1]);
    }

    [FixtureFact]
    public async Task BrokenTextIsA400()
    {
        await using var server = await fixture.StartAsync();
        // Invalid UTF-8 (a lone continuation byte, an overlong encoding) inside a string and outside the fields we read.
        var prefix = Encoding.UTF8.GetBytes("""{"model":"tiny","messages":[{"role":"user","content":"a""");
        var suffix = Encoding.UTF8.GetBytes("""b"}],"max_tokens":2}""");
        foreach (var bad in new byte[][] { [0x80], [0xC0, 0xAF], [0xED, 0xA0, 0x80], [0xFF] })
            await ErrorAssert.IsError(await server.PostBytesAsync([.. prefix, .. bad, .. suffix]), 400);
        await ErrorAssert.IsError(await server.PostBytesAsync(Encoding.UTF8.GetBytes("{\"model\":\"tiny\",\"x\":\"").Concat(new byte[] { 0xFE, (byte)'"', (byte)'}' }).ToArray()), 400);
        // Escaped lone surrogates, which no .NET string can hold, in every string the server reads.
        foreach (var (json, param) in new[]
        {
            ("""{"model":"tiny","messages":[{"role":"user","content":"a\ud800b"}]}""", "messages[0].content"),
            ("""{"model":"tiny","messages":[{"role":"user","content":"\udfff"}]}""", "messages[0].content"),
            ("""{"model":"ti\ud800ny","messages":[{"role":"user","content":"a"}]}""", "model"),
            ("""{"model":"tiny","messages":[{"role":"us\ud800er","content":"a"}]}""", "messages[0].role"),
            ("""{"model":"tiny","messages":[{"role":"user","content":[{"type":"text","text":"\ud800"}]}]}""", "messages[0].content[0]"),
            ("""{"model":"tiny","messages":[{"role":"user","content":[{"type":"te\ud800xt"}]}]}""", "messages[0].content[0]"),
            ("""{"model":"tiny","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:\ud800"}}]}]}""", "image_url"),
            ("""{"model":"tiny","messages":[{"role":"user","content":"a"}],"stop":["\ud800"]}""", "stop"),
        })
            await ErrorAssert.IsError(await server.PostJsonAsync(json), 400, param);
        Assert.Equal(200, (int)(await server.PostJsonAsync(Body(maxTokens: 2))).StatusCode);
    }

    [FixtureFact]
    public async Task CrossSitePostsAreRefused()
    {
        await using var server = await fixture.StartAsync();
        var body = Encoding.UTF8.GetBytes(Body(maxTokens: 2));
        // What a page on another site can send without a CORS preflight, and charsets other than UTF-8.
        foreach (var type in new[] { "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json; charset=latin1", "" })
            await ErrorAssert.IsError(await server.PostBytesAsync(body, type), 415);
        Assert.Equal(0, server.Client.Engine.Stats.Steps);
        Assert.Equal(200, (int)(await server.PostBytesAsync(body, "application/json; charset=utf-8")).StatusCode);
        Assert.Equal(200, (int)(await server.PostBytesAsync(body, "Application/JSON")).StatusCode);
    }

    [FixtureFact]
    public async Task OnLoopbackOnlyLoopbackHostNamesAreAccepted()
    {
        int port;
        await using (var server = await fixture.StartAsync())
        {
            port = server.Address.Port;
            foreach (var host in new[] { $"localhost:{port}", $"127.0.0.1:{port}", "127.0.0.2", $"[::1]:{port}", "LOCALHOST" })
                Assert.Equal(200, (int)(await Get(server, "/v1/models", host)).StatusCode);
            // A DNS-rebound name (attacker.example → 127.0.0.1) reads nothing, not even /health.
            foreach (var host in new[] { $"attacker.example:{port}", "localhost.attacker.example", "127.0.0.1.nip.io", "0.0.0.0" })
            {
                var error = await ErrorAssert.IsError(await Get(server, "/v1/models", host), 400);
                Assert.Equal("host_not_allowed", error.GetProperty("code").GetString());
                await ErrorAssert.IsError(await Get(server, "/health", host), 400);
                await ErrorAssert.IsError(await server.PostBytesAsync(Encoding.UTF8.GetBytes(Body(maxTokens: 2)), host: host), 400);
            }
        }
        await using (var widened = await fixture.StartAsync(new ServerOptions { AllowedHosts = ["*.example.com", "gpu-box"] }))
        {
            Assert.Equal(200, (int)(await Get(widened, "/v1/models", "api.example.com")).StatusCode);
            Assert.Equal(200, (int)(await Get(widened, "/v1/models", "gpu-box:8000")).StatusCode);
            Assert.Equal(200, (int)(await Get(widened, "/v1/models", "localhost")).StatusCode);
            await ErrorAssert.IsError(await Get(widened, "/v1/models", "attacker.example"), 400);
        }
        await using (var any = await fixture.StartAsync(new ServerOptions { AllowedHosts = ["*"] }))
            Assert.Equal(200, (int)(await Get(any, "/v1/models", "attacker.example")).StatusCode);

        static Task<HttpResponseMessage> Get(TestServer server, string path, string host)
        {
            var request = new HttpRequestMessage(HttpMethod.Get, path);
            request.Headers.Host = host;
            return server.Http.SendAsync(request);
        }
    }

    [FixtureFact]
    public async Task OverlongTextIsRefusedByItsLengthBeforeTokenising()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { MaxContextTokens = 1000 });
        long bound = server.Client.MaxPromptChars;
        Assert.Equal(1000L * 128, bound);   // InternLM2's longest token is a run of 128 spaces
        var error = await ErrorAssert.IsError(await server.PostAsync(TestServer.UserRequest(new string('a', (int)bound + 1))), 400, "messages");
        Assert.Contains("characters", error.GetProperty("message").GetString());
        // Under the bound but over the context: the exact token count decides, after tokenising.
        var exact = await ErrorAssert.IsError(await server.PostAsync(TestServer.UserRequest(new string('a', 20_000))), 400, "messages");
        Assert.Contains("tokens", exact.GetProperty("message").GetString());
    }

    /// <summary>A large body takes a request slot before a byte of it is read (and is read when its turn comes).</summary>
    [FixtureFact]
    public async Task LargeBodiesAreAdmittedBeforeTheyAreRead()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { MaxConcurrentRequests = 1 });
        var state = (ServingState)server.Services.GetService(typeof(ServingState))!;
        using (var stalled = await SendHeadersAsync(server, 2 * 1024 * 1024 + 100))
        {
            Assert.True(await EventuallyAsync(() => state.InFlight == 1), "the large upload holds no slot");
            await ErrorAssert.IsError(await server.PostAsync(TestServer.UserRequest("hi", maxTokens: 2)), 429);
        }
        Assert.True(await EventuallyAsync(() => state.InFlight == 0), "the abandoned upload kept its slot");
        Assert.Equal(200, (int)(await server.PostAsync(TestServer.UserRequest("hi", maxTokens: 2))).StatusCode);
    }

    /// <summary>Connections that send nothing, or headers and no body, hold no request slot: others are served.</summary>
    [FixtureFact]
    public async Task SilentConnectionsHoldNoSlot()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { MaxConcurrentRequests = 2 });
        var state = (ServingState)server.Services.GetService(typeof(ServingState))!;
        var silent = new List<TcpClient>();
        try
        {
            for (int i = 0; i < 10; i++)
            {
                var idle = new TcpClient();
                await idle.ConnectAsync(server.Address.Host, server.Address.Port);
                silent.Add(idle);
                silent.Add(await SendHeadersAsync(server, 500));
            }
            Assert.Equal(200, (int)(await server.PostAsync(TestServer.UserRequest("hi", maxTokens: 2))).StatusCode);
            Assert.Equal(0, state.InFlight);
        }
        finally { foreach (var c in silent) c.Dispose(); }
    }

    /// <summary>The request line and headers of a chat completion whose body never comes.</summary>
    private static async Task<TcpClient> SendHeadersAsync(TestServer server, long contentLength)
    {
        var client = new TcpClient();
        await client.ConnectAsync(server.Address.Host, server.Address.Port);
        var head = $"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {contentLength}\r\n\r\n{{\"model\":";
        await client.GetStream().WriteAsync(Encoding.ASCII.GetBytes(head));
        return client;
    }

    [FixtureFact]
    public async Task ADisconnectMidStreamFreesItsSequence()
    {
        await using var server = await fixture.StartAsync();
        var state = (ServingState)server.Services.GetService(typeof(ServingState))!;
        using (var response = await server.PostJsonAsync(Body("long", maxTokens: 4000, stream: true)))
            Assert.Equal(3, (await TestServer.ReadEventsAsync(response, take: 3)).Count);
        Assert.True(await EventuallyAsync(() => server.Client.Engine.Stats.Running == 0 && state.InFlight == 0),
            $"running {server.Client.Engine.Stats.Running}, in flight {state.InFlight} after the client left");
    }

    /// <summary>Stopping (as on SIGTERM): a long stream ends with an error event after the grace, and the body ends properly.</summary>
    [FixtureFact]
    public async Task ShutdownEndsStreamsCleanly()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { ShutdownGraceSeconds = 0.2 });
        using var response = await server.PostJsonAsync(Body("long", maxTokens: 4000, stream: true));
        var reading = TestServer.ReadEventsAsync(response);
        Assert.True(await EventuallyAsync(() => server.Client.Engine.Stats.Running == 1));
        await server.StopAsync();
        var events = await reading;
        using var last = JsonDocument.Parse(events[^1]);
        Assert.Equal("server_shutting_down", last.RootElement.GetProperty("error").GetProperty("code").GetString());
        // The engine drops the ended sequence at its next step.
        Assert.True(await EventuallyAsync(() => server.Client.Engine.Stats.Running == 0));
    }

    /// <summary>
    /// Good clients stream while others send hostile requests: bad sampling values, broken UTF-8, bodies over the
    /// limit, streams abandoned mid-answer. Every good stream ends with [DONE]; no hostile request gets a 5xx.
    /// </summary>
    [FixtureFact]
    public async Task UnderMixedLoadEveryGoodStreamEndsWithDone()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { MaxRequestBytes = 256 * 1024 });
        var good = Enumerable.Range(0, 4).Select(async client =>
        {
            var ends = new List<string>();
            for (int round = 0; round < 3; round++)
                ends.Add((await StreamAsync(server, Body($"client {client} round {round}", maxTokens: 40, stream: true)))[^1]);
            return ends;
        }).ToList();

        var statuses = new List<int>();
        var bad = Encoding.UTF8.GetBytes(Body()).Concat(new byte[] { 0xC3 }).ToArray();
        for (int round = 0; round < 6; round++)
        {
            statuses.Add((int)(await server.PostJsonAsync(Body(stream: true, extra: "\"temperature\": 5e-39"))).StatusCode);
            statuses.Add((int)(await server.PostJsonAsync(Body(extra: "\"repetition_penalty\": 1e-300, \"temperature\": 1"))).StatusCode);
            statuses.Add((int)(await server.PostJsonAsync(Body(extra: "\"top_p\": 4.9e-324, \"temperature\": 2, \"repetition_penalty\": 100"))).StatusCode);
            statuses.Add((int)(await server.PostBytesAsync(bad)).StatusCode);
            statuses.Add((int)(await server.PostJsonAsync("""{"model":"tiny","messages":[{"role":"user","content":"\ud800"}]}""")).StatusCode);
            statuses.Add((int)(await server.PostAsync(TestServer.UserRequest(new string('x', 300 * 1024)))).StatusCode);
            using var abandoned = await server.PostJsonAsync(Body("abandon", maxTokens: 4000, stream: true));
            statuses.Add((int)abandoned.StatusCode);
            await TestServer.ReadEventsAsync(abandoned, take: 2);
        }
        foreach (var ends in await Task.WhenAll(good)) Assert.All(ends, end => Assert.Equal("[DONE]", end));
        Assert.All(statuses, status => Assert.True(status < 500, $"a hostile request got {status}"));
        Assert.Contains(413, statuses);
        Assert.True(await EventuallyAsync(() => server.Client.Engine.Stats.Running == 0));
    }
}
