using System.Text.Json;
using VlmTune.Serving;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Serving;

/// <summary>
/// The image-feature cache through HTTP: the chat client marks where each image's tiles end, so an image sent again —
/// alone or beside others — is a hit; /metrics counts hits, misses and bytes; answers equal a cache-off server's.
/// </summary>
public sealed class ImageCacheServingTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    private static string Ivl1Url => ServerFixture.DataUrl(File.ReadAllBytes(Path.Combine(Fixtures.TinyDir, "images", "ivl1.jpg")));
    private static string ClotUrl => ServerFixture.DataUrl(ServerFixture.Clot);

    private static async Task<string> AnswerAsync(TestServer server, params string[] images)
    {
        var parts = images.Select(u => (object)new { type = "image_url", image_url = new { url = u } }).Append(new { type = "text", text = "Describe." }).ToArray();
        using var response = await server.PostAsync(new { model = ServerFixture.ModelId, messages = new[] { new { role = "user", content = parts } }, max_tokens = 6, temperature = 0 });
        var body = await response.Content.ReadAsStringAsync();
        Assert.True(200 == (int)response.StatusCode, body);
        using var doc = JsonDocument.Parse(body);
        return doc.RootElement.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString()!;
    }

    private static async Task<PrometheusExposition> ScrapeAsync(TestServer server) =>
        PrometheusExposition.Parse(await server.Http.GetStringAsync("/metrics"));

    [FixtureFact]
    public async Task AnImageSentAgainIsAHitCountedInMetrics()
    {
        string[] expected;
        await using (var off = await fixture.StartAsync(new ServerOptions { ImageCacheMib = 0 }))
        {
            expected = [await AnswerAsync(off, ClotUrl, Ivl1Url), await AnswerAsync(off, Ivl1Url)];
            var m = await ScrapeAsync(off);
            Assert.Equal(0, m.Value("vlmtune_image_cache_capacity_bytes"));
            Assert.Equal(0, m.Value("vlmtune_image_cache_hits_total") + m.Value("vlmtune_image_cache_misses_total"));
        }

        await using var server = await fixture.StartAsync(new ServerOptions { ImageCacheMib = 8 });
        Assert.Equal(expected[0], await AnswerAsync(server, ClotUrl, Ivl1Url));
        var first = await ScrapeAsync(server);
        Assert.Equal(0, first.Value("vlmtune_image_cache_hits_total"));
        Assert.Equal(2, first.Value("vlmtune_image_cache_misses_total"));   // one per image, not one per request
        Assert.Equal(8 << 20, first.Value("vlmtune_image_cache_capacity_bytes"));

        Assert.Equal(expected[1], await AnswerAsync(server, Ivl1Url));
        var second = await ScrapeAsync(server);
        Assert.Equal(1, second.Value("vlmtune_image_cache_hits_total"));
        Assert.Equal(2, second.Value("vlmtune_image_cache_misses_total"));
        Assert.Equal(server.Client.Engine.ImageCache.Bytes, second.Value("vlmtune_image_cache_bytes"));
        Assert.True(second.Value("vlmtune_image_cache_bytes") is > 0 and <= 8 << 20);
        PrometheusExposition.AssertNeverDecreases(first, second);
    }
}
