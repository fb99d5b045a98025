using System.Net;
using System.Text.Json;
using System.Text.RegularExpressions;
using Microsoft.AspNetCore.Builder;
using VlmTune.Data;
using VlmTune.Serving;
using VlmTune.Tests.Data;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Serving;

/// <summary>A started <c>data browse</c> host over a generated CLoT-like set, with an HTTP client on its address.</summary>
public sealed class BrowseHost : IAsyncDisposable
{
    public TempDir Dir { get; } = new();
    public DatasetBrowser Browser { get; }
    public WebApplication App { get; }
    public HttpClient Http { get; }
    public Uri Address { get; }

    private BrowseHost(ValidationOptions options, ManualResetEventSlim? hold, Func<TempDir, string> write)
    {
        Browser = DatasetBrowser.Open(write(Dir), null, options, hold);
        App = DatasetBrowserServer.Build(Browser);
        App.StartAsync().GetAwaiter().GetResult();
        Address = VlmTuneServer.Address(App);
        Http = new HttpClient { BaseAddress = Address, Timeout = TimeSpan.FromSeconds(60) };
    }

    /// <param name="write">Writes the data into the folder and returns its path (default: the CLoT-like set).</param>
    public static BrowseHost Start(ValidationOptions options, ManualResetEventSlim? hold = null, Func<TempDir, string>? write = null) =>
        new(options, hold, write ?? ClotLikeData.Write);

    public async Task<(int Status, JsonElement Body)> GetJson(string path)
    {
        using var response = await Http.GetAsync(path);
        using var doc = JsonDocument.Parse(await response.Content.ReadAsStringAsync());
        return ((int)response.StatusCode, doc.RootElement.Clone());
    }

    public async ValueTask DisposeAsync()
    {
        Http.Dispose();
        await App.StopAsync();
        await App.DisposeAsync();
        Browser.Dispose();
        Dir.Dispose();
    }
}

public sealed class DatasetBrowserServerTests
{
    private static ValidationOptions Options => new() { MaxLength = 3000, Length = new CharCount() };

    private sealed class CharCount : ISampleLengthCounter
    {
        public int Count(IReadOnlyList<VlmTune.Text.ConversationTurn> conversation, IReadOnlyList<int> imageTiles) =>
            conversation.Sum(t => t.Value.Length) + 256 * imageTiles.Sum();
    }

    private static async Task<JsonElement> Summary(BrowseHost host)
    {
        await host.Browser.Scan;
        return (await host.GetJson("/api/summary")).Body;
    }

    [Fact]
    public async Task BindsLoopbackAndServesThePage()
    {
        await using var host = BrowseHost.Start(Options);
        Assert.True(IPAddress.IsLoopback(IPAddress.Parse(host.Address.Host)));
        var html = await host.Http.GetStringAsync("/");
        Assert.Contains("vlmtune data browse", html);

        // DNS rebinding: a foreign Host name is refused on loopback.
        using var request = new HttpRequestMessage(HttpMethod.Get, "/api/summary");
        request.Headers.Host = "evil.example";
        using var refused = await host.Http.SendAsync(request);
        Assert.Equal(HttpStatusCode.BadRequest, refused.StatusCode);
    }

    [Fact]
    public async Task SummaryPagingFilterAndSearch()
    {
        await using var host = BrowseHost.Start(Options);
        var summary = await Summary(host);
        Assert.Equal(ClotLikeData.Records, summary.GetProperty("records").GetInt64());
        Assert.Equal(ClotLikeData.Broken.Count, summary.GetProperty("errors").GetInt64());
        Assert.True(summary.GetProperty("complete").GetBoolean());
        Assert.Equal(DataSummary.HistogramBins, summary.GetProperty("lengths").GetProperty("histogram").GetArrayLength());

        var (status, page) = await host.GetJson("/api/samples?offset=5&limit=5");
        Assert.Equal(200, status);
        Assert.Equal(new long[] { 5, 6, 7, 8, 9 }, page.GetProperty("samples").EnumerateArray().Select(s => s.GetProperty("index").GetInt64()));
        var missing = page.GetProperty("samples")[1];   // line 7... index 6 is line 7: the corrupt image
        Assert.Equal("ImageUndecodable", missing.GetProperty("problems")[0].GetProperty("kind").GetString());

        (_, page) = await host.GetJson("/api/samples?problems=true&limit=100");
        Assert.Equal(ClotLikeData.Broken.Keys.Order(), page.GetProperty("samples").EnumerateArray().Select(s => s.GetProperty("line").GetInt64()));
        Assert.True(page.GetProperty("complete").GetBoolean());

        (_, page) = await host.GetJson($"/api/samples?q={ClotLikeData.UniqueWord}");
        Assert.Equal("clot-13", page.GetProperty("samples").EnumerateArray().Single().GetProperty("id").GetString());

        (status, var error) = await host.GetJson("/api/samples?limit=1000");
        Assert.Equal(400, status);
        Assert.Contains("limit", error.GetProperty("error").GetString());
    }

    [Fact]
    public async Task DetailImageAndRefusals()
    {
        await using var host = BrowseHost.Start(Options);
        var (status, detail) = await host.GetJson("/api/samples/1");
        Assert.Equal(200, status);
        var grid = detail.GetProperty("grids")[0];
        Assert.Equal((2, 1, true), (grid.GetProperty("columns").GetInt32(), grid.GetProperty("rows").GetInt32(), grid.GetProperty("thumbnail").GetBoolean()));
        Assert.Equal(3, detail.GetProperty("sample").GetProperty("images")[0].GetProperty("tiles").GetInt32());

        using var image = await host.Http.GetAsync("/api/samples/1/images/0");
        Assert.Equal(HttpStatusCode.OK, image.StatusCode);
        Assert.Equal("image/jpeg", image.Content.Headers.ContentType!.MediaType);
        Assert.Equal(await File.ReadAllBytesAsync(host.Dir["root/images/wide.jpg"]), await image.Content.ReadAsByteArrayAsync());

        // Line 26 names ../outside.jpg: refused with the reason, the file never served.
        (status, var error) = await host.GetJson("/api/samples/25/images/0");
        Assert.Equal(400, status);
        Assert.Contains("leaves the image root", error.GetProperty("error").GetString());
        (status, _) = await host.GetJson("/api/samples/3/images/0");   // line 4: the image is missing
        Assert.Equal(404, status);
        (status, _) = await host.GetJson("/api/samples/1/images/1");
        Assert.Equal(404, status);
        (status, _) = await host.GetJson($"/api/samples/{ClotLikeData.Records}");
        Assert.Equal(404, status);
        (status, _) = await host.GetJson("/api/nothing");
        Assert.Equal(404, status);
    }

    [Fact]
    public async Task TheFirstPageAnswersWhileTheSummaryIsStillCounting()
    {
        using var hold = new ManualResetEventSlim(false);
        await using var host = BrowseHost.Start(Options, hold, dir =>
        {
            dir.Jpeg("a.jpg", 16, 16);
            var line = """{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}""" + "\n";
            return dir.Write("big.jsonl", string.Concat(Enumerable.Repeat(line, 40_000)));
        });
        var (status, page) = await host.GetJson("/api/samples?offset=0&limit=20");
        Assert.Equal(200, status);
        Assert.Equal(20, page.GetProperty("samples").GetArrayLength());
        var (_, partial) = await host.GetJson("/api/summary");
        Assert.False(partial.GetProperty("complete").GetBoolean());
        hold.Set();
        var summary = await Summary(host);
        Assert.Equal(40_000, summary.GetProperty("records").GetInt64());
    }

    [Fact]
    public async Task CliValidateJsonPrintsTheBrowsersSummary()
    {
        using var dir = new TempDir();
        var data = ClotLikeData.Write(dir);
        var (code, stdout, _) = await CliProcess.RunAsync(["data", "validate", "--data", data, "--json"], timeoutSeconds: 120);
        Assert.Equal(1, code);   // it has errors
        using var printed = JsonDocument.Parse(stdout);
        using var browser = DatasetBrowser.Open(data, null, new ValidationOptions());
        await browser.Scan;
        var expected = JsonSerializer.Serialize(browser.Summary(), new JsonSerializerOptions { PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower });
        using var expectedDoc = JsonDocument.Parse(expected);
        Assert.True(JsonElement.DeepEquals(expectedDoc.RootElement, printed.RootElement), $"--json printed:\n{stdout}\nthe browser:\n{expected}");
    }

    [Fact]
    public async Task CliBrowseRefusesAFileThatIsNotADatasetInOneLine()
    {
        using var dir = new TempDir();
        var notes = dir.Write("notes.jsonl", "just some notes\n");
        var (code, _, stderr) = await CliProcess.RunAsync(["data", "browse", notes, "--port", "0"], timeoutSeconds: 120);
        Assert.Equal(1, code);
        Assert.Single(stderr.Trim().Split('\n'));
        Assert.Contains("is not training data", stderr);
    }

    [Fact]
    public async Task CliBrowseServesOnLoopbackAndStopsOnSigint()
    {
        using var dir = new TempDir();
        var data = ClotLikeData.Write(dir);
        using var cli = CliProcess.Start(["data", "browse", data, "--port", "0"]);
        Assert.True(await cli.WaitForOutputAsync("Browsing ", 120), $"browse did not start:\n{cli.Stdout}\n{cli.Stderr}");
        var address = new Uri(Regex.Match(cli.Stdout, @"on (http://\S+?)/? ").Groups[1].Value);
        Assert.Equal("127.0.0.1", address.Host);
        using var http = new HttpClient { BaseAddress = address };
        Assert.Contains("\"records\"", await http.GetStringAsync("/api/summary"));
        cli.Signal(2);
        Assert.Equal(0, await cli.WaitAsync(30));
    }
}
