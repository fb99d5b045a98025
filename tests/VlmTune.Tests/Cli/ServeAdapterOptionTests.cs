using System.Text.RegularExpressions;
using VlmTune.Cli.Commands;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Cli;

/// <summary><c>serve --adapter</c>: NAME=PATH repeated serves several adapters; one bare PATH is the merged model of today.</summary>
[Collection(HelpTextTests.TreeCollection)]   // the shared command tree
public sealed partial class ServeAdapterOptionTests
{
    [GeneratedRegex(@"on (http://127\.0\.0\.1:\d+/)")]
    private static partial Regex AddressLine();

    /// <summary>The real CLI serving a named adapter: it says what it serves, and lists and answers for it.</summary>
    [FixtureFact]
    public async Task ServeListsANamedAdapter()
    {
        using var cli = CliProcess.Start(["serve", "--model", Fixtures.TinyModel, "--port", "0", "--model-id", "tiny-cli", "--adapter", $"alpha={Fixtures.Adapter}"]);
        Assert.True(await cli.WaitForOutputAsync("Serving", 120), cli.Stderr);
        Assert.Contains("adapter alpha: PEFT adapter: LLM LoRA r=8 alpha=16", cli.Stdout);
        Assert.Contains("1 adapter(s) beside tiny-cli, batched over the unmerged base", cli.Stdout);
        using var http = new HttpClient { BaseAddress = new Uri(AddressLine().Match(cli.Stdout).Groups[1].Value) };
        var models = await http.GetStringAsync("/v1/models");
        Assert.Contains("\"tiny-cli\"", models);
        Assert.Contains("\"alpha\"", models);
    }

    private static VlmTune.Serving.ServerOptions Bind(params string[] args) =>
        ServeCommand.Bind(HelpTextTests.Tree.Parse(["serve", "--model", Fixtures.TinyModel, .. args]));

    [FixtureFact]
    public void RepeatedNamedAdaptersAndOneBarePathBind()
    {
        var named = Bind("--adapter", $"alpha={Fixtures.Adapter}", "--adapter", $"beta={Fixtures.Adapter}", "--allow-adapter-loading", Fixtures.TinyDir, "--api-key", "k");
        Assert.Equal([$"alpha={Fixtures.Adapter}", $"beta={Fixtures.Adapter}"], named.Adapters);
        Assert.Null(named.AdapterDir);
        Assert.Equal(Fixtures.TinyDir, named.AllowAdapterLoading);
        Assert.True(named.ServesAdapters);

        var bare = Bind("--adapter", Fixtures.Adapter);
        Assert.Equal(Fixtures.Adapter, bare.AdapterDir);
        Assert.Empty(bare.Adapters);
        Assert.False(bare.ServesAdapters);

        var two = Assert.Throws<VlmTuneException>(() => Bind("--adapter", Fixtures.Adapter, "--adapter", Fixtures.TinyModel));
        Assert.Contains("several need names: --adapter NAME=PATH", two.Message);
        var mixed = Assert.Throws<VlmTuneException>(() => Bind("--adapter", Fixtures.Adapter, "--adapter", $"alpha={Fixtures.Adapter}"));
        Assert.Contains("cannot be combined", mixed.Message);
    }

    [FixtureFact]
    public async Task BadAdapterValuesFailWithOneLineEach()
    {
        var (code, _, stderr) = await CliProcess.RunAsync(["serve", "--model", Fixtures.TinyModel, "--port", "0",
            "--adapter", $"bad name={Fixtures.Adapter}", "--adapter", "gone=/nonexistent/adapter", "--adapter", $"a={Fixtures.Adapter}", "--adapter", $"a={Fixtures.Adapter}"], timeoutSeconds: 120);
        Assert.Equal(1, code);
        Assert.Contains("'bad name' is not a model name", stderr);
        Assert.Contains("--adapter gone=/nonexistent/adapter: folder not found.", stderr);
        Assert.Contains("--adapter a: the name is given twice", stderr);
        Assert.DoesNotContain("   at ", stderr);
    }
}
