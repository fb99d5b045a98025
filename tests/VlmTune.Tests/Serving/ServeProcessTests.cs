using System.Net;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Serving;

/// <summary>The real <c>vlmtune serve</c> process: how it stops on signals, and how it says it cannot start.</summary>
public sealed class ServeProcessTests
{
    private static string[] Serve(params string[] extra) => ["serve", "--model", Fixtures.TinyModel, .. extra];

    /// <summary>
    /// SIGTERM (systemd, Docker, Kubernetes) and SIGINT (Ctrl-C) with a stream in flight: the stream ends cleanly
    /// ([DONE], or an error event once the grace is over, and a complete body), the process exits 0 within 10 s.
    /// </summary>
    [FixtureTheory]
    [InlineData(15)]
    [InlineData(2)]
    public async Task ASignalStopsTheServerCleanly(int signal)
    {
        using var cli = CliProcess.Start(Serve("--port", "0", "--model-id", ServerFixture.ModelId), new Dictionary<string, string> { ["VLMTUNE_Serve__ShutdownGraceSeconds"] = "1" });
        Assert.True(await cli.WaitForOutputAsync("Serving ", 120), $"serve did not start:\n{cli.Stdout}\n{cli.Stderr}");
        var address = new Uri(Regex.Match(cli.Stdout, @"on (http://\S+?)/? ").Groups[1].Value);
        using var http = new HttpClient { BaseAddress = address, Timeout = TimeSpan.FromSeconds(60) };
        var body = JsonSerializer.Serialize(TestServer.UserRequest("a long story", maxTokens: 4000, stream: true));
        using var response = await http.SendAsync(new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions")
        {
            Content = new StringContent(body, Encoding.UTF8, "application/json"),
        }, HttpCompletionOption.ResponseHeadersRead);
        Assert.Equal(200, (int)response.StatusCode);
        using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
        var events = new List<string>();
        while (events.Count < 3 && await reader.ReadLineAsync() is { } line) if (line.StartsWith("data: ")) events.Add(line[6..]);

        cli.Signal(signal);
        // Reading to the end throws if the connection is cut instead of the body being finished.
        while (await reader.ReadLineAsync() is { } line) if (line.StartsWith("data: ")) events.Add(line[6..]);
        Assert.Equal(0, await cli.WaitAsync(10));
        if (events[^1] != "[DONE]")
        {
            using var last = JsonDocument.Parse(events[^1]);
            Assert.Equal("server_shutting_down", last.RootElement.GetProperty("error").GetProperty("code").GetString());
        }
        Assert.Contains("Stopped.", cli.Stdout);
        Assert.DoesNotContain("   at ", cli.Stderr);
    }

    /// <summary>The commands that listen: serve (with a model), data browse (with the demo data) and dashboard (of an empty folder).</summary>
    private static string[] Listening(string command, params string[] extra) => command switch
    {
        "serve" => Serve(extra),
        "dashboard" => ["dashboard", Path.GetTempPath(), .. extra],
        _ => ["data", "browse", Path.Combine(Fixtures.RepoRoot, "configs", "data", "tiny_sft.jsonl"), .. extra],
    };

    [FixtureTheory]
    [InlineData("serve")]
    [InlineData("browse")]
    [InlineData("dashboard")]
    public async Task APortInUseIsOneLineNamingAFreePort(string command)
    {
        using var taken = new TcpListener(IPAddress.Loopback, 0);
        taken.Start();
        int port = ((IPEndPoint)taken.LocalEndpoint).Port;
        var (code, stdout, stderr) = await CliProcess.RunAsync(Listening(command, "--port", port.ToString()), timeoutSeconds: 120);
        Assert.Equal(1, code);
        var match = Regex.Match(stderr, $@"^error: port {port} is in use on 127\.0\.0\.1; pass --port (\d+) \(free now\), or stop what listens there\.\n$");
        Assert.True(match.Success, $"stderr:\n{stderr}");
        Assert.True(int.Parse(match.Groups[1].Value) > port);
        Assert.DoesNotContain("Serving", stdout);
    }

    [FixtureTheory]
    [InlineData("serve")]
    [InlineData("browse")]
    [InlineData("dashboard")]
    public async Task AHostNotOfThisMachineIsOneLine(string command)
    {
        // 192.0.2.0/24 is TEST-NET-1: documentation only, never an address of a real machine.
        var (code, _, stderr) = await CliProcess.RunAsync(Listening(command, "--host", "192.0.2.7", "--port", "0"), timeoutSeconds: 120);
        Assert.Equal(1, code);
        Assert.Equal("error: --host 192.0.2.7 is not an address of this machine; pass one of its addresses, 127.0.0.1 or 0.0.0.0 (all).\n", stderr);
    }

    [FixtureFact]
    public async Task APortInUseIsSaidBeforeTheModelLoads()
    {
        using var taken = new TcpListener(IPAddress.Loopback, 0);
        taken.Start();
        int port = ((IPEndPoint)taken.LocalEndpoint).Port;
        // An empty folder would fail the model load (no config.json); the port is checked first.
        var empty = Directory.CreateTempSubdirectory("vlmtune-not-a-model-");
        try
        {
            var (code, _, stderr) = await CliProcess.RunAsync(["serve", "--model", empty.FullName, "--port", port.ToString()]);
            Assert.Equal(1, code);
            Assert.StartsWith($"error: port {port} is in use", stderr);
        }
        finally { empty.Delete(); }
    }
}
