using VlmTune.Hub;

namespace VlmTune.Tests.Hub;

/// <summary>Option resolution and file selection: no hub needed.</summary>
public sealed class HubSettingsTests
{
    [Theory]
    [InlineData("*.json", "config.json", true)]
    [InlineData("*.json", "sub/config.json", true)] // fnmatch: * crosses folders
    [InlineData("*.json", "config.json.bak", false)]
    [InlineData("examples/", "examples/a/b.txt", true)]
    [InlineData("model-0000?-of-00002.safetensors", "model-00001-of-00002.safetensors", true)]
    [InlineData("[!m]*", "model.safetensors", false)]
    [InlineData("[ct]*", "tokenizer.model", true)]
    [InlineData("a+b(c).txt", "a+b(c).txt", true)]
    public void GlobPatternsMatchLikeFnmatch(string pattern, string path, bool matches) =>
        Assert.Equal(matches, new HubFileFilter([pattern], null).Keeps(path));

    [Fact]
    public void EndpointAndTokenComeFromTheEnvironmentUnlessGiven()
    {
        var env = new Dictionary<string, string>
        {
            ["HF_ENDPOINT"] = "https://mirror.example/", ["HF_TOKEN"] = "hf_env", ["MODELSCOPE_DOMAIN"] = "ms.example",
            ["HF_HUB_OFFLINE"] = "true",
        };
        var hf = HubSettings.Resolve(new HubDownloadOptions { RepoId = "a/b", LocalDir = "x" }, env.GetValueOrDefault);
        Assert.Equal(("https://mirror.example", "hf_env", "main", true), (hf.Endpoint, hf.Token, hf.Revision, hf.Offline));
        var flags = HubSettings.Resolve(new HubDownloadOptions { RepoId = "a/b", LocalDir = "x", Endpoint = "http://h:1", Token = "t", Offline = false }, env.GetValueOrDefault);
        Assert.Equal(("http://h:1", "t", false), (flags.Endpoint, flags.Token, flags.Offline));
        var ms = HubSettings.Resolve(new HubDownloadOptions { RepoId = "a/b", LocalDir = "x", Source = HubSource.ModelScope }, env.GetValueOrDefault);
        Assert.Equal(("https://ms.example", null, "master"), (ms.Endpoint, ms.Token, ms.Revision));

        var bad = Assert.Throws<HubDownloadException>(() =>
            HubSettings.Resolve(new HubDownloadOptions { RepoId = "a/b/c", LocalDir = "", Endpoint = "ftp://x" }, _ => null));
        Assert.Contains("owner/name", bad.Message);
        Assert.Contains("--local-dir", bad.Message);
        Assert.Contains("ftp://x", bad.Message);
    }
}
