using System.Text.Json;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Cli;

public sealed class ChatCommandTests
{
    /// <summary>Every golden case through <c>vlmtune chat --json</c>: decoding, tiling, prompt and generation end to end.</summary>
    [FixtureTheory]
    [InlineData("text_only")]
    [InlineData("one_image")]
    [InlineData("two_images")]
    public void JsonOutputHasTheGoldenGreedyIds(string caseName)
    {
        var c = Fixtures.Golden.GetProperty("cases").GetProperty(caseName);
        var expected = c.GetProperty("greedy_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        var args = new List<string> { "chat", "--model", Fixtures.TinyModel, "--prompt", c.GetProperty("question").GetString()!,
            "--max-new-tokens", expected.Length.ToString(), "--json" };
        var images = c.GetProperty("images").EnumerateArray().Select(e => e.GetString()!).ToList();
        foreach (var name in images)
        {
            args.Add("--image");
            args.Add(Path.Combine(Fixtures.TinyDir, Fixtures.Golden.GetProperty("images").GetProperty(name).GetProperty("file").GetString()!));
        }
        var r = Run(args);
        Assert.True(r.ExitCode == 0, r.Stderr);
        using var json = JsonDocument.Parse(r.Stdout);
        Assert.Equal(expected, json.RootElement.GetProperty("token_ids").EnumerateArray().Select(e => e.GetInt32()));
        Assert.Equal(c.GetProperty("prompt_ids_len").GetInt32(), json.RootElement.GetProperty("prompt_tokens").GetInt32());
        Assert.Equal(images.Select(n => Fixtures.Golden.GetProperty("images").GetProperty(n).GetProperty("tiles").GetInt32()),
            json.RootElement.GetProperty("tiles").EnumerateArray().Select(e => e.GetInt32()));
    }

    [FixtureTheory]
    [InlineData(2, true, 3)]      // the 1:3 image's best grid within 2 tiles is 1×2, + the thumbnail (the default 12 gives 1×3 + 1)
    [InlineData(12, false, 1)]    // dynamic_image_size false: one resized tile, no thumbnail, as the official code
    public void TilingDefaultsComeFromTheModelsConfig(int maxDynamicPatch, bool dynamic, int tiles)
    {
        using var b = new ModelFolderBuilder().Config(c => { c["max_dynamic_patch"] = maxDynamicPatch; c["dynamic_image_size"] = dynamic; });
        var r = Run(["chat", "--model", b.Build(), "--image", Path.Combine(Fixtures.TinyDir, "images", "tall.png"), "--prompt", "hi",
            "--max-new-tokens", "1", "--json"]);
        Assert.True(r.ExitCode == 0, r.Stderr);
        using var json = JsonDocument.Parse(r.Stdout);
        Assert.Equal([tiles], json.RootElement.GetProperty("tiles").EnumerateArray().Select(e => e.GetInt32()));
    }

    [FixtureFact]
    public void MissingTensorFailsNamingTheTensor()
    {
        using var b = new ModelFolderBuilder().Drop("mlp1.0.bias");
        AssertFails(Chat(b.Build()), "'mlp1.0.bias'", b.Dir);
    }

    [FixtureFact]
    public void WrongShapeFailsNamingTheTensor()
    {
        using var b = new ModelFolderBuilder().Reshape("mlp1.3.weight", 128, 32);
        AssertFails(Chat(b.Build()), "shape mismatch for 'mlp1.3.weight'", "expected [64, 64], got [128, 32]");
    }

    [FixtureFact]
    public void CorruptSafetensorsFailsNamingTheFile()
    {
        using var b = new ModelFolderBuilder();
        var dir = b.Build();
        var path = Path.Combine(dir, "model.safetensors");
        var bytes = File.ReadAllBytes(path);
        bytes[8] = (byte)'[';   // the header JSON no longer parses as an object
        File.WriteAllBytes(path, bytes);
        AssertFails(Chat(dir), path, "corrupt safetensors header");
    }

    [FixtureFact]
    public void UnknownArchitectureFails()
    {
        using var b = new ModelFolderBuilder().Config(c => c["llm_config"]!["architectures"] = new System.Text.Json.Nodes.JsonArray("MistralForCausalLM"));
        AssertFails(Chat(b.Build()), "'MistralForCausalLM'", "supported: InternLM2ForCausalLM, Qwen2ForCausalLM");
    }

    [FixtureFact]
    public void UnreadableImageFailsNamingTheFile()
    {
        var path = Path.Combine(Path.GetTempPath(), $"vlmtune-broken-{Guid.NewGuid():N}.jpg");
        File.WriteAllBytes(path, [0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3]);
        try { AssertFails(Chat(Fixtures.TinyModel, "--image", path), path); }
        finally { File.Delete(path); }
    }

    [FixtureFact]
    public void OversizedImageIsRejectedFromItsHeader()
    {
        // A PNG whose header claims 20000×20000 pixels (400 MP) with almost no data: rejected before decoding.
        var path = Path.Combine(Path.GetTempPath(), $"vlmtune-bomb-{Guid.NewGuid():N}.png");
        File.WriteAllBytes(path, VlmTune.Tests.Vision.TestImages.PngHeaderOnly(20000, 20000));
        try { AssertFails(Chat(Fixtures.TinyModel, "--image", path), path, "20000"); }
        finally { File.Delete(path); }
    }

    /// <summary>The CLI checks --max-new-tokens with the one check before it loads anything.</summary>
    [Fact]
    public void BadMaxNewTokensIsRefusedBeforeTheModelLoads()
    {
        var r = Run(["chat", "--model", "/nonexistent/model", "--prompt", "hi", "--max-new-tokens", "0"]);
        AssertFails(r, "max_tokens must be ≥ 1 (got 0).");
        Assert.DoesNotContain("/nonexistent/model", r.Stderr);
    }

    [FixtureFact]
    public void MissingImageFileFails()
    {
        AssertFails(Chat(Fixtures.TinyModel, "--image", "/nonexistent/cat.png"), "/nonexistent/cat.png");
    }

    private static (int ExitCode, string Stdout, string Stderr) Run(IEnumerable<string> args) =>
        CliProcess.RunAsync(args, timeoutSeconds: 300).GetAwaiter().GetResult();

    private static (int ExitCode, string Stdout, string Stderr) Chat(string model, params string[] extra) =>
        Run(new[] { "chat", "--model", model, "--prompt", "hi", "--max-new-tokens", "2" }.Concat(extra));

    private static void AssertFails((int ExitCode, string Stdout, string Stderr) r, params string[] mentions)
    {
        Assert.NotEqual(0, r.ExitCode);
        Assert.StartsWith("error:", r.Stderr.TrimStart());
        foreach (var m in mentions) Assert.Contains(m, r.Stderr);
        Assert.DoesNotContain("   at ", r.Stderr);   // a message, not a stack trace
    }
}
