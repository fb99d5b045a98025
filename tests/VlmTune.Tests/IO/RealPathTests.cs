using System.Diagnostics;
using VlmTune.IO;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.IO;

public sealed class RealPathTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vlmtune-realpath-").FullName;

    public void Dispose()
    {
        try { Directory.Delete(_dir, true); } catch (IOException) { }
    }

    private string P(params string[] parts) => Path.Combine([_dir, .. parts]);

    [Fact]
    public void FollowsEverySymlinkAndTakesDotDotAfterTheLink()
    {
        Directory.CreateDirectory(P("data", "models", "base"));
        Directory.CreateSymbolicLink(P("link"), P("data", "models", "base"));
        Directory.CreateSymbolicLink(P("relative"), "data/models");   // a relative target
        Directory.CreateSymbolicLink(P("chain"), P("link"));

        string real = RealPath.Of(P("data", "models", "base"));
        Assert.Equal(real, RealPath.Of(P("link")));
        Assert.Equal(real, RealPath.Of(P("chain")));
        Assert.Equal(real, RealPath.Of(P("relative", "base")));
        // The kernel takes "link/.." as the parent of the link's target, not as the folder holding the link.
        Assert.Equal(RealPath.Of(P("data", "models")), RealPath.Of(P("link") + "/.."));
        // What does not exist yet is kept as written, under the resolved part.
        Assert.Equal(Path.Combine(real, "new", "file.json"), RealPath.Of(P("link", "new", "file.json")));

        Assert.True(RealPath.IsSameOrInside(P("chain", "x"), P("data")));
        Assert.True(RealPath.Overlap(P("data", "models"), P("link")));
        Assert.False(RealPath.Overlap(P("data", "models", "base2"), P("link")));   // a prefix of the name is not inside
    }

    [Fact]
    public void SymlinkLoopsAreAClearError()
    {
        File.CreateSymbolicLink(P("a"), P("b"));
        File.CreateSymbolicLink(P("b"), P("a"));
        var e = Assert.Throws<VlmTuneException>(() => RealPath.Of(P("a", "x")));
        Assert.Contains("too many levels of symbolic links", e.Message);
    }

    [Fact]
    public void SameFileSeesHardLinksSymlinksAndOtherSpellings()
    {
        File.WriteAllText(P("input.jsonl"), "{}\n");
        Process.Start("ln", [P("input.jsonl"), P("hard.jsonl")])!.WaitForExit();
        File.CreateSymbolicLink(P("soft.jsonl"), P("input.jsonl"));
        File.WriteAllText(P("other.jsonl"), "{}\n");

        Assert.True(RealPath.SameFile(P("input.jsonl"), P("hard.jsonl")));
        Assert.True(RealPath.SameFile(P("input.jsonl"), P("soft.jsonl")));
        Directory.CreateDirectory(P("sub"));
        Assert.True(RealPath.SameFile(P("input.jsonl"), P("sub") + "/./../input.jsonl"));
        Assert.False(RealPath.SameFile(P("input.jsonl"), P("other.jsonl")));
        Assert.False(RealPath.SameFile(P("input.jsonl"), P("missing.jsonl")));
    }
}
