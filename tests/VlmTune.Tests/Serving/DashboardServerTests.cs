using System.Net;
using System.Text.Json;
using System.Text.RegularExpressions;
using Microsoft.AspNetCore.Builder;
using SkiaSharp;
using VlmTune.Serving;
using VlmTune.Tests.Data;
using VlmTune.Tests.Support;
using VlmTune.Tests.Training;

namespace VlmTune.Tests.Serving;

/// <summary>
/// Two work dirs as the trainer leaves them: <c>lora/</c> with a finished run and a resumed one still running (eval
/// answers with images, two checkpoints), <c>qlora/</c> with one run; and a started dashboard over the folder.
/// </summary>
public sealed class DashboardHost : IAsyncDisposable
{
    public TempDir Dir { get; } = new();
    public string Root => Dir["work_dirs"];
    public string Running { get; }
    public string Finished { get; }
    public string Other { get; }
    public string Image0 { get; }
    public string Image1 { get; }
    public WebApplication App { get; }
    public HttpClient Http { get; }
    public Uri Address { get; }

    public const string RunningId = "lora/20261201_120000", FinishedId = "lora/20261201_100000", OtherId = "qlora/20261201_110000";

    public DashboardHost()
    {
        Finished = FakeRuns.Write(Root, "lora", "20261201_100000", upTo: 20, total: 20, finished: true, scale: 1.25);
        Running = FakeRuns.Write(Root, "lora", "20261201_120000", upTo: 32, total: 40, evals: [(16, 2.25), (32, 1.5)]);
        Other = FakeRuns.Write(Root, "qlora", "20261201_110000", upTo: 12, total: 40, scale: 0.8);
        FakeRuns.Checkpoint(Path.Combine(Root, "lora"), 16, bytes: 5000);
        FakeRuns.Checkpoint(Path.Combine(Root, "lora"), 32, bytes: 7000);
        Directory.CreateDirectory(Path.Combine(Root, "lora", ".iter_48.tmp-1@host-x"));   // a checkpoint being written is none
        Directory.CreateDirectory(Path.Combine(Root, "lora", "iter_40"));                 // nor one without trainer_state.json
        Image0 = FakeRuns.Image(Dir["eval_images"], "cat.jpg", 64, 40);
        Image1 = FakeRuns.Image(Dir["eval_images"], "dog.jpg", 40, 64);
        FakeRuns.Eval(Running, 16, 2.25, [Image0, Image1]);
        FakeRuns.Eval(Running, 32, 1.5, [Image0, Image1]);
        App = DashboardServer.Build(Root);
        App.StartAsync().GetAwaiter().GetResult();
        Address = VlmTuneServer.Address(App);
        Http = new HttpClient { BaseAddress = Address, Timeout = TimeSpan.FromSeconds(60) };
    }

    public async Task<(int Status, JsonElement Body)> GetJson(string path)
    {
        using var response = await Http.GetAsync(path);
        string text = await response.Content.ReadAsStringAsync();
        using var doc = JsonDocument.Parse(text.Length == 0 ? "null" : text);
        return ((int)response.StatusCode, doc.RootElement.Clone());
    }

    public static string Q(string s) => Uri.EscapeDataString(s);

    public async ValueTask DisposeAsync()
    {
        Http.Dispose();
        await App.StopAsync();
        await App.DisposeAsync();
        Dir.Dispose();
    }
}

public sealed class DashboardServerTests
{
    private static JsonElement Run(JsonElement runs, string id) => runs.GetProperty("runs").EnumerateArray().Single(r => r.GetProperty("id").GetString() == id);

    [Fact]
    public async Task ListsEveryRunWithProgressEvalsAndCheckpoints()
    {
        await using var host = new DashboardHost();
        var (status, body) = await host.GetJson("/api/runs");
        Assert.Equal(200, status);
        Assert.Equal(host.Root, body.GetProperty("root").GetString());
        Assert.Equal([DashboardHost.FinishedId, DashboardHost.RunningId, DashboardHost.OtherId],
            body.GetProperty("runs").EnumerateArray().Select(r => r.GetProperty("id").GetString()));

        var running = Run(body, DashboardHost.RunningId);
        Assert.Equal("lora/20261201_120000", running.GetProperty("label").GetString());
        Assert.Equal("running", running.GetProperty("state").GetString());
        Assert.Equal((32, 40), (running.GetProperty("iter").GetInt32(), running.GetProperty("total").GetInt32()));
        Assert.Equal("0:00:02", running.GetProperty("eta").GetString());   // from the last Iter(train) line of the log
        Assert.Equal(8, running.GetProperty("points").GetInt32());
        Assert.Equal(1.5, running.GetProperty("best_eval").GetProperty("eval_loss").GetDouble());
        Assert.Equal([16, 32], running.GetProperty("eval_files").EnumerateArray().Select(e => e.GetInt32()));
        Assert.Equal(FakeRuns.Loss(32), running.GetProperty("latest").GetProperty("loss").GetDouble(), 12);
        var checkpoints = running.GetProperty("checkpoints").EnumerateArray().ToList();
        Assert.Equal(["iter_16", "iter_32"], checkpoints.Select(c => c.GetProperty("name").GetString()));
        Assert.Equal(7000 + "{\"iteration\": 32}".Length, checkpoints[1].GetProperty("bytes").GetInt64());

        Assert.Equal("finished", Run(body, DashboardHost.FinishedId).GetProperty("state").GetString());
        var other = Run(body, DashboardHost.OtherId);
        Assert.Empty(other.GetProperty("checkpoints").EnumerateArray());
        Assert.Equal(JsonValueKind.Null, other.GetProperty("best_eval").ValueKind);
    }

    [Fact]
    public async Task ServesScalarsAsTheyAreAppendedAndTheConfig()
    {
        await using var host = new DashboardHost();
        var (_, scalars) = await host.GetJson($"/api/scalars?run={DashboardHost.Q(DashboardHost.RunningId)}");
        Assert.Equal(Enumerable.Range(1, 8).Select(i => i * 4), scalars.GetProperty("train").EnumerateArray().Select(p => p.GetProperty("iter").GetInt32()));
        Assert.Equal([16, 32], scalars.GetProperty("eval").EnumerateArray().Select(p => p.GetProperty("iter").GetInt32()));

        File.AppendAllText(Path.Combine(host.Running, "vis_data", "scalars.json"), FakeRuns.ScalarsLine(36) + "\n" + FakeRuns.ScalarsLine(40)[..30]);
        (_, scalars) = await host.GetJson($"/api/scalars?run={DashboardHost.Q(DashboardHost.RunningId)}");
        Assert.Equal(36, scalars.GetProperty("train").EnumerateArray().Last().GetProperty("iter").GetInt32());   // the half-written line waits
        Assert.Equal(JsonValueKind.Null, scalars.GetProperty("problem").ValueKind);

        var (_, config) = await host.GetJson($"/api/config?run={DashboardHost.Q(DashboardHost.OtherId)}");
        Assert.Contains("name: 'qlora'", config.GetProperty("yaml").GetString());
    }

    [Fact]
    public async Task ServesEvalAnswersWithTheirImages()
    {
        await using var host = new DashboardHost();
        var (status, eval) = await host.GetJson($"/api/eval?run={DashboardHost.Q(DashboardHost.RunningId)}&iter=32");
        Assert.Equal(200, status);
        Assert.Equal(1.5, eval.GetProperty("eval_loss").GetDouble());
        var answers = eval.GetProperty("answers").EnumerateArray().ToList();
        Assert.Equal(2, answers.Count);
        Assert.Equal("The model's answer 1 at 32.", answers[1].GetProperty("answer").GetString());
        string url = answers[1].GetProperty("images")[0].GetString()!;
        using var response = await host.Http.GetAsync(url);
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        Assert.Equal("image/jpeg", response.Content.Headers.ContentType!.MediaType);
        Assert.Equal(File.ReadAllBytes(host.Image1), await response.Content.ReadAsByteArrayAsync());

        var (_, list) = await host.GetJson($"/api/evals?run={DashboardHost.Q(DashboardHost.RunningId)}");
        Assert.Equal([16, 32], list.EnumerateArray().Select(e => e.GetProperty("iter").GetInt32()));
    }

    [Fact]
    public async Task CurvesOfSeveralRunsComeAsOnePng()
    {
        await using var host = new DashboardHost();
        using var response = await host.Http.GetAsync($"/api/curves.png?run={DashboardHost.Q(DashboardHost.RunningId)}&run={DashboardHost.Q(DashboardHost.OtherId)}&width=800&height=500");
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        Assert.Equal("image/png", response.Content.Headers.ContentType!.MediaType);
        using var bitmap = SKBitmap.Decode(await response.Content.ReadAsByteArrayAsync());
        Assert.Equal((800, 500), (bitmap.Width, bitmap.Height));
    }

    [Theory]
    [InlineData("/api/scalars?run=..%2F..%2F..%2Fetc", 404)]
    [InlineData("/api/config?run=..", 404)]
    [InlineData("/api/config?run=%2Fetc", 404)]
    [InlineData("/api/config?run=lora", 404)]                          // a work dir is not a run
    [InlineData("/api/eval?run=lora%2F20261201_120000&iter=8", 404)]    // no evaluation at 8
    [InlineData("/api/eval?run=lora%2F20261201_120000&iter=..%2F..%2Fx", 400)]
    [InlineData("/api/eval-image?run=lora%2F20261201_120000&iter=32&answer=0&image=1", 404)]
    [InlineData("/api/eval-image?run=lora%2F20261201_120000&iter=32&answer=2&image=0", 404)]
    [InlineData("/api/eval-image?run=lora%2F20261201_120000&iter=32&answer=-1&image=0", 404)]
    [InlineData("/..%2F..%2F..%2Fetc%2Fpasswd", 404)]
    [InlineData("/api/..%2F..%2Fetc%2Fpasswd", 404)]
    [InlineData("/api/curves.png", 400)]
    public async Task NoRequestReachesAFileOutsideTheRuns(string path, int expected)
    {
        await using var host = new DashboardHost();
        using var response = await host.Http.GetAsync(path);
        Assert.Equal(expected, (int)response.StatusCode);
        Assert.DoesNotContain("root:", await response.Content.ReadAsStringAsync());
    }

    [Fact]
    public async Task OnlyImagesAreServedEvenWhenAnEvalFileNamesOtherFiles()
    {
        await using var host = new DashboardHost();
        string secret = host.Dir.Write("secret.txt", "root:x:0:0");
        FakeRuns.Eval(host.Running, 48, 1.0, [secret, host.Image0, Path.Combine(host.Dir.Path, "gone.jpg")]);
        string Image(int answer) => $"/api/eval-image?run={DashboardHost.Q(DashboardHost.RunningId)}&iter=48&answer={answer}&image=0";
        using var text = await host.Http.GetAsync(Image(0));
        Assert.Equal(HttpStatusCode.NotFound, text.StatusCode);
        Assert.DoesNotContain("root:x", await text.Content.ReadAsStringAsync());
        using var image = await host.Http.GetAsync(Image(1));
        Assert.Equal(HttpStatusCode.OK, image.StatusCode);
        using var gone = await host.Http.GetAsync(Image(2));
        Assert.Equal(HttpStatusCode.NotFound, gone.StatusCode);
    }

    [Fact]
    public async Task BindsLoopbackServesThePageAndRefusesForeignHosts()
    {
        await using var host = new DashboardHost();
        Assert.True(IPAddress.IsLoopback(IPAddress.Parse(host.Address.Host)));
        Assert.Contains("vlmtune dashboard", await host.Http.GetStringAsync("/"));
        using var request = new HttpRequestMessage(HttpMethod.Get, "/api/runs");
        request.Headers.Host = "evil.example";
        using var refused = await host.Http.SendAsync(request);
        Assert.Equal(HttpStatusCode.BadRequest, refused.StatusCode);
    }

    [Fact]
    public async Task ARunFolderItselfCanBeTheRoot()
    {
        await using var host = new DashboardHost();
        await using var app = DashboardServer.Build(host.Running);
        await app.StartAsync();
        using var http = new HttpClient { BaseAddress = VlmTuneServer.Address(app) };
        using var doc = JsonDocument.Parse(await http.GetStringAsync("/api/runs"));
        var run = Assert.Single(doc.RootElement.GetProperty("runs").EnumerateArray());
        Assert.Equal((".", "lora/20261201_120000"), (run.GetProperty("id").GetString(), run.GetProperty("label").GetString()));
        Assert.Equal(2, run.GetProperty("checkpoints").GetArrayLength());   // its work dir's, beside it
        Assert.Equal([16, 32], run.GetProperty("eval_files").EnumerateArray().Select(e => e.GetInt32()));
        await app.StopAsync();
    }

    [Fact]
    public async Task NewRunsAppearWithoutARestart()
    {
        await using var host = new DashboardHost();
        FakeRuns.Write(host.Root, "full", "20261202_090000", upTo: 4);
        var (_, body) = await host.GetJson("/api/runs");
        Assert.Contains("full/20261202_090000", body.GetProperty("runs").EnumerateArray().Select(r => r.GetProperty("id").GetString()));
    }

    [Fact]
    public async Task CliDashboardServesOnLoopbackAndStopsOnSigterm()
    {
        await using var host = new DashboardHost();   // only its folder: the CLI serves it in its own process
        using var cli = CliProcess.Start(["dashboard", host.Root, "--port", "0"]);
        Assert.True(await cli.WaitForOutputAsync("Dashboard of ", 120), $"dashboard did not start:\n{cli.Stdout}\n{cli.Stderr}");
        Assert.Contains("(3 runs now)", cli.Stdout);
        var address = new Uri(Regex.Match(cli.Stdout, @"on (http://\S+?)/?\. ").Groups[1].Value);
        Assert.Equal("127.0.0.1", address.Host);
        using var http = new HttpClient { BaseAddress = address };
        Assert.Contains(DashboardHost.RunningId, await http.GetStringAsync("/api/runs"));
        cli.Signal(15);
        Assert.Equal(0, await cli.WaitAsync(30));
    }

    [Fact]
    public async Task CliDashboardOfAMissingFolderIsOneErrorLine()
    {
        using var dir = new TempDir();
        var (code, _, stderr) = await CliProcess.RunAsync(["dashboard", dir["nope"], "--port", "0"], timeoutSeconds: 120);
        Assert.Equal(1, code);
        Assert.Equal($"error: {dir["nope"]} is not a folder (expected a work dir, a run folder or a folder of work dirs).", stderr.Trim());
    }
}
