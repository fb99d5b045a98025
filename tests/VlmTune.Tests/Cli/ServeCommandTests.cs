using System.Net.Http.Headers;
using System.Text.RegularExpressions;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Cli;

public sealed partial class ServeCommandTests
{
    [GeneratedRegex(@"on (http://127\.0\.0\.1:\d+/)")]
    private static partial Regex AddressLine();

    /// <summary>The real CLI: flags and VLMTUNE_Serve__* variables bind, the server answers, the key guards the API.</summary>
    [FixtureFact]
    public async Task ServeStartsAndAnswers()
    {
        using var cli = CliProcess.Start(["serve", "--model", Fixtures.TinyModel, "--port", "0", "--max-batch", "4", "--model-id", "tiny-cli"],
            new Dictionary<string, string> { ["VLMTUNE_Serve__ApiKey"] = "from-env" });
        Assert.True(await cli.WaitForOutputAsync("Serving", 120), cli.Stderr);
        var address = new Uri(AddressLine().Match(cli.Stdout).Groups[1].Value);
        using var http = new HttpClient { BaseAddress = address };
        Assert.Equal(200, (int)(await http.GetAsync("/health")).StatusCode);
        Assert.Equal(401, (int)(await http.GetAsync("/v1/models")).StatusCode);
        http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", "from-env");
        var models = await http.GetStringAsync("/v1/models");
        Assert.Contains("\"tiny-cli\"", models);
    }

    [Fact]
    public async Task BadFlagsFailWithOneClearLine()
    {
        var (code, _, stderr) = await CliProcess.RunAsync(["serve", "--model", "/nonexistent/model", "--port", "70000", "--max-batch", "0"]);
        Assert.Equal(1, code);
        Assert.Contains("--port must be 0..65535", stderr);
        Assert.Contains("--max-batch must be ≥ 1", stderr);
    }
}
