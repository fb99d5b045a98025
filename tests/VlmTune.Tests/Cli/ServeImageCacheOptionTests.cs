using VlmTune.Cli.Commands;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Cli;

/// <summary><c>serve --image-cache-mib N</c>: binds (0 turns the cache off), defaults to the device's budget, refuses a negative size.</summary>
[Collection(HelpTextTests.TreeCollection)]   // the shared command tree
public sealed class ServeImageCacheOptionTests
{
    private static VlmTune.Serving.ServerOptions Bind(params string[] args) =>
        ServeCommand.Bind(HelpTextTests.Tree.Parse(["serve", "--model", Fixtures.TinyModel, .. args]));

    [FixtureFact]
    public void ImageCacheMibBinds()
    {
        Assert.Null(Bind().ImageCacheMib);
        Assert.Equal(0, Bind("--image-cache-mib", "0").ImageCacheMib);
        Assert.Equal(256, Bind("--image-cache-mib", "256").ImageCacheMib);
        var e = Assert.Throws<VlmTuneException>(() => Bind("--image-cache-mib", "-1"));
        Assert.Contains("--image-cache-mib must be 0 (off)", e.Message);
    }
}
