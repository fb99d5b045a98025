using System.Text;
using System.Text.Json;
using VlmTune.Serving;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Serving;

/// <summary>Every kind of bad request gets its 4xx in OpenAI's error shape, and the server keeps answering.</summary>
public sealed class BadInputTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    private static string Png(int width, int height)
    {
        using var bitmap = new SkiaSharp.SKBitmap(width, height);
        bitmap.Erase(SkiaSharp.SKColors.CornflowerBlue);
        using var data = SkiaSharp.SKImage.FromBitmap(bitmap).Encode(SkiaSharp.SKEncodedImageFormat.Png, 100);
        return ServerFixture.DataUrl(data.ToArray(), "image/png");
    }

    /// <summary>A valid PNG signature and IHDR claiming a huge canvas, with no pixel data behind it.</summary>
    private static string PngHeaderClaiming(int width, int height)
    {
        var bytes = new List<byte> { 0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 13, (byte)'I', (byte)'H', (byte)'D', (byte)'R' };
        var ihdr = new List<byte>();
        ihdr.AddRange(BitConverter.GetBytes(System.Buffers.Binary.BinaryPrimitives.ReverseEndianness(width)));
        ihdr.AddRange(BitConverter.GetBytes(System.Buffers.Binary.BinaryPrimitives.ReverseEndianness(height)));
        ihdr.AddRange(new byte[] { 8, 2, 0, 0, 0 });
        bytes.AddRange(ihdr);
        uint crc = Crc32([.. "IHDR"u8.ToArray(), .. ihdr]);
        bytes.AddRange(BitConverter.GetBytes(System.Buffers.Binary.BinaryPrimitives.ReverseEndianness(crc)));
        return ServerFixture.DataUrl([.. bytes], "image/png");
    }

    private static uint Crc32(byte[] data)
    {
        uint crc = 0xFFFFFFFF;
        foreach (var b in data)
        {
            crc ^= b;
            for (int k = 0; k < 8; k++) crc = (crc & 1) != 0 ? (crc >> 1) ^ 0xEDB88320u : crc >> 1;
        }
        return ~crc;
    }

    public static TheoryData<string, string, int, string?> Cases() => new()
    {
        { "malformed JSON", "{\"model\": \"tiny\", \"messages\": [", 400, null },
        { "not an object", "[1, 2]", 400, null },
        { "unknown model", Request(model: "gpt-4o"), 404, "model" },
        { "no messages", """{"model":"tiny","messages":[]}""", 400, "messages" },
        { "bad role", """{"model":"tiny","messages":[{"role":"tool","content":"x"}]}""", 400, "messages[0].role" },
        { "content of wrong type", """{"model":"tiny","messages":[{"role":"user","content":42}]}""", 400, "messages[0].content" },
        { "unknown part type", """{"model":"tiny","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{}}]}]}""", 400, "messages[0].content[0]" },
        { "ends with assistant", """{"model":"tiny","messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}""", 400, "messages" },
        { "temperature too high", Request(extra: "\"temperature\": 3"), 400, "temperature" },
        { "temperature not a number", Request(extra: "\"temperature\": \"hot\""), 400, "temperature" },
        { "top_p zero", Request(extra: "\"top_p\": 0"), 400, "top_p" },
        { "max_tokens zero", Request(extra: "\"max_tokens\": 0"), 400, "max_tokens" },
        { "max_tokens above the server limit", Request(extra: "\"max_tokens\": 100000"), 400, "max_tokens" },
        { "n > 1", Request(extra: "\"n\": 2"), 400, "n" },
        { "stop of wrong type", Request(extra: "\"stop\": 5"), 400, "stop" },
        { "seed not an integer", Request(extra: "\"seed\": 1.5"), 400, "seed" },
        { "stream_options without stream", Request(extra: "\"stream_options\": {\"include_usage\": true}"), 400, "stream_options" },
        { "tools", Request(extra: "\"tools\": [{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]"), 400, "tools" },
        { "reserved image token in text", Request(text: "hi <IMG_CONTEXT> there"), 400, "messages[0].content" },
        { "placeholders not matching images", Request(text: "<image> and <image>", images: [ServerFixture.DataUrl(ServerFixture.Clot)]), 400, "messages[0].content" },
        { "undecodable image", Request(images: [ServerFixture.DataUrl(Encoding.ASCII.GetBytes("this is not an image at all, just text"), "image/png")]), 400, "image_url" },
        { "truncated JPEG", Request(images: [ServerFixture.DataUrl(ServerFixture.Clot[..(ServerFixture.Clot.Length / 3)])]), 400, "image_url" },
        { "1x1 image", Request(images: [Png(1, 1)]), 400, "image_url" },
        { "oversized image (header)", Request(images: [PngHeaderClaiming(30000, 30000)]), 400, "image_url" },
        { "not base64", Request(images: ["data:image/png;base64,@@@not-base64@@@"]), 400, "image_url" },
        { "data URL not base64", Request(images: ["data:image/png,rawbytes"]), 400, "image_url" },
        { "data URL not an image type", Request(images: ["data:text/html;base64,PGI+aGk8L2I+"]), 400, "image_url" },
        { "remote URL while disabled", Request(images: ["http://example.com/cat.png"]), 400, "image_url" },
        { "local path while disabled", Request(images: ["/etc/passwd"]), 400, "image_url" },
        { "unknown scheme", Request(images: ["ftp://example.com/cat.png"]), 400, "image_url" },
        { "too many images", Request(images: Enumerable.Repeat(ServerFixture.DataUrl(ServerFixture.Clot), 9).ToArray()), 400, "image_url" },
        { "prompt + max_tokens beyond the context", Request(extra: "\"max_tokens\": 990"), 400, "max_tokens" },
        { "empty body", "", 400, null },
        { "null body", "null", 400, null },
        { "nesting beyond 32 levels", "{\"model\":\"tiny\",\"messages\":" + new string('[', 5000) + new string(']', 5000) + "}", 400, null },
        { "n beyond int", Request(extra: "\"n\": 1e12"), 400, "n" },
        { "max_tokens beyond int", Request(extra: "\"max_tokens\": 99999999999"), 400, "max_tokens" },
        { "top_k beyond int", Request(extra: "\"top_k\": 10000000000"), 400, "top_k" },
        { "seed beyond long", Request(extra: "\"seed\": 1e30"), 400, "seed" },
        { "temperature beyond double", Request(extra: "\"temperature\": 1e400"), 400, "temperature" },
        { "repetition_penalty that is 0 in fp32", Request(extra: "\"repetition_penalty\": 1e-300"), 400, "repetition_penalty" },
        { "repetition_penalty that is inf in fp32", Request(extra: "\"repetition_penalty\": 1e300"), 400, "repetition_penalty" },
    };

    private static string Request(string model = ServerFixture.ModelId, string text = "hello", string[]? images = null, string? extra = null)
    {
        var parts = (images ?? []).Select(u => (object)new { type = "image_url", image_url = new { url = u, detail = "auto" } }).Append(new { type = "text", text });
        var json = JsonSerializer.Serialize(new { model, messages = new[] { new { role = "user", content = parts.ToArray() } } });
        return extra is null ? json : json[..^1] + ", " + extra + "}";
    }

    [FixtureFact]
    public async Task EachBadInputGetsItsStatus()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { MaxContextTokens = 1000, MaxTokens = 2000, MaxImagesPerRequest = 8 });
        var failures = new List<string>();
        foreach (var row in Cases())
        {
            var (name, body, status, param) = ((string)row[0], (string)row[1], (int)row[2], (string?)row[3]);
            var response = await server.PostJsonAsync(body);
            try { await ErrorAssert.IsError(response, status, param); }
            catch (Exception e) { failures.Add($"{name}: {e.Message}"); }
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures));
        // After all that, a good request still works.
        var ok = await server.PostAsync(TestServer.UserRequest("hello", maxTokens: 3));
        Assert.Equal(200, (int)ok.StatusCode);
    }

    /// <summary>
    /// Over HTTP max_tokens goes through the one check (the chat client's, with the server's limit), before any image is
    /// read: a limit far below the context shows the check itself answered, not the engine's context check.
    /// </summary>
    [FixtureFact]
    public async Task MaxTokensIsRefusedByTheOneCheckBeforeImagesAreRead()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { MaxContextTokens = 1000, MaxTokens = 5 });
        async Task<string?> Refused(string body) =>
            (await ErrorAssert.IsError(await server.PostJsonAsync(body), 400, "max_tokens")).GetProperty("message").GetString();
        Assert.Equal("max_tokens must be between 1 and 5 (got 6).", await Refused(Request(extra: "\"max_tokens\": 6")));
        Assert.Equal("max_tokens must be between 1 and 5 (got 0).", await Refused(Request(extra: "\"max_completion_tokens\": 0")));
        Assert.Equal("max_tokens must be between 1 and 5 (got 6).", await Refused(Request(images: ["http://example.com/cat.png"], extra: "\"max_tokens\": 6")));
        Assert.Equal(200, (int)(await server.PostJsonAsync(Request(extra: "\"max_tokens\": 5"))).StatusCode);
    }

    [FixtureFact]
    public async Task OversizedBodyIs413()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { MaxRequestBytes = 4096 });
        var response = await server.PostAsync(TestServer.UserRequest(new string('a', 10_000)));
        await ErrorAssert.IsError(response, 413);
    }

    [FixtureFact]
    public async Task FullServerAnswers429()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { MaxConcurrentRequests = 1 });
        using var cut = new CancellationTokenSource();
        var body = JsonSerializer.Serialize(TestServer.UserRequest("long", maxTokens: 3000, stream: true));
        using var first = await server.PostJsonAsync(body, cancellation: cut.Token);   // streaming: headers mean it is running
        Assert.Equal(200, (int)first.StatusCode);
        await ErrorAssert.IsError(await server.PostAsync(TestServer.UserRequest("second", maxTokens: 2)), 429);
        cut.Cancel();
    }

    [FixtureFact]
    public async Task SlowRequestTimesOutWith504AndLeavesTheBatch()
    {
        await using var server = await fixture.StartAsync(new ServerOptions { RequestTimeoutSeconds = 0.3 });
        await ErrorAssert.IsError(await server.PostAsync(TestServer.UserRequest("long", maxTokens: 4000)), 504);
        for (int i = 0; i < 200 && server.Client.Engine.Stats.Running > 0; i++) await Task.Delay(25);
        Assert.Equal(0, server.Client.Engine.Stats.Running);

        // Streaming: the status went out with the first token, so the timeout arrives as an error event.
        var streamed = await server.PostAsync(TestServer.UserRequest("long", maxTokens: 4000, stream: true));
        Assert.Equal(200, (int)streamed.StatusCode);
        var last = (await streamed.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries)[^1];
        using var error = JsonDocument.Parse(last["data: ".Length..]);
        Assert.Equal("timeout", error.RootElement.GetProperty("error").GetProperty("code").GetString());
    }

    [FixtureFact]
    public async Task UnknownEndpointIs404InOpenAiShape()
    {
        await using var server = await fixture.StartAsync();
        await ErrorAssert.IsError(await server.Http.GetAsync("/v1/embeddings"), 404);
    }

    [FixtureFact]
    public async Task StreamedAnswerEndsWithUsageAndDone()
    {
        await using var server = await fixture.StartAsync();
        var body = JsonSerializer.Serialize(new
        {
            model = ServerFixture.ModelId, stream = true, stream_options = new { include_usage = true }, max_tokens = 4, temperature = 0,
            messages = new object[] { new { role = "system", content = "Be brief." }, new { role = "user", content = "hi" } },
        });
        var response = await server.PostJsonAsync(body);
        Assert.Equal("text/event-stream", response.Content.Headers.ContentType!.MediaType);
        var events = (await response.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries);
        Assert.All(events, e => Assert.StartsWith("data: ", e));
        Assert.Equal("data: [DONE]", events[^1]);
        using var usage = JsonDocument.Parse(events[^2][6..]);
        Assert.Equal(0, usage.RootElement.GetProperty("choices").GetArrayLength());
        Assert.Equal(4, usage.RootElement.GetProperty("usage").GetProperty("completion_tokens").GetInt32());
        using var finish = JsonDocument.Parse(events[^3][6..]);
        Assert.Equal("length", finish.RootElement.GetProperty("choices")[0].GetProperty("finish_reason").GetString());
        using var first = JsonDocument.Parse(events[0][6..]);
        Assert.Equal("assistant", first.RootElement.GetProperty("choices")[0].GetProperty("delta").GetProperty("role").GetString());
    }
}
