using VlmTune.IO;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.IO;

public sealed class OwnedTemporaryTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vlmtune-owned-").FullName;

    public void Dispose()
    {
        try { Directory.Delete(_dir, true); } catch (IOException) { }
    }

    [Fact]
    public void RemovesOnlyWhatDeadProcessesOfThisHostLeft()
    {
        string dead = Temporaries.Folder(Path.Combine(_dir, Temporaries.OfDeadProcess(".out.merge-tmp-")));
        string deadFile = Path.Combine(_dir, Temporaries.OfDeadProcess("data.json.tmp-"));
        File.WriteAllText(deadFile, "[");
        string live = Temporaries.Folder(Path.Combine(_dir, Temporaries.OfLiveProcess(".out.merge-tmp-")));
        string otherHost = Temporaries.Folder(Path.Combine(_dir, Temporaries.OfOtherHost(".out.merge-tmp-")));
        string untagged = Temporaries.Folder(Path.Combine(_dir, ".out.merge-tmp-0123456789abcdef0123456789abcdef"));
        string unrelated = Temporaries.Folder(Path.Combine(_dir, Temporaries.OfDeadProcess(".other.merge-tmp-")));
        // A link named like a temporary is removed itself; what it points at is not touched.
        string target = Temporaries.Folder(Path.Combine(_dir, "precious"));
        string link = Path.Combine(_dir, Temporaries.OfDeadProcess(".out.merge-tmp-"));
        Directory.CreateSymbolicLink(link, target);

        var removed = OwnedTemporary.RemoveStale(_dir, n => n.StartsWith(".out.merge-tmp-", StringComparison.Ordinal) || n.StartsWith("data.json.tmp-", StringComparison.Ordinal));

        Assert.Equal(new[] { dead, deadFile, link }.Order(), removed.Order());
        Assert.False(Directory.Exists(dead));
        Assert.False(File.Exists(deadFile));
        Assert.False(Path.Exists(link));
        foreach (var kept in new[] { live, otherHost, untagged, unrelated, target }) Assert.True(Directory.Exists(kept), kept);
        Assert.True(File.Exists(Path.Combine(target, "part.bin")));
    }

    [Fact]
    public void NamesCarryThisProcessAndAreNeverStaleWhileItRuns()
    {
        string name = Path.GetFileName(OwnedTemporary.Beside(Path.Combine(_dir, "model.safetensors")));
        Assert.StartsWith($"model.safetensors.tmp-{Environment.ProcessId}@", name);
        Assert.False(OwnedTemporary.IsStale(name));
        Assert.True(OwnedTemporary.IsStale(Temporaries.OfDeadProcess("model.safetensors.tmp-")));
        Assert.False(OwnedTemporary.IsStale("model.safetensors.tmp-123-0123456789abcdef0123456789abcdef"));   // no host: unknown owner
    }
}
