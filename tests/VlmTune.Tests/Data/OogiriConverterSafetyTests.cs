using System.Diagnostics;
using System.Text;
using VlmTune.Data;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Data;

/// <summary>convert-oogiri never replaces its input, reads nothing outside the dataset, and tells bad bytes from text.</summary>
public sealed class OogiriConverterSafetyTests
{
    private const string Line = """{"type": "I2T", "question": null, "image": "a", "text": "梗"}""";

    private static TempDir Dataset(string text)
    {
        var dir = new TempDir();
        dir.Jpeg("images/a.jpg", 8, 6);
        dir.Write("cn.jsonl", text);
        return dir;
    }

    [Fact]
    public void AnOutputThatIsTheInputUnderAnyNameIsRefusedAndTheInputKept()
    {
        using var dir = Dataset(Line + "\n");
        Directory.CreateDirectory(dir["sub"]);
        File.CreateSymbolicLink(dir["link.jsonl"], dir["cn.jsonl"]);
        Directory.CreateSymbolicLink(dir["dirlink"], dir.Path);
        Process.Start("ln", [dir["cn.jsonl"], dir["hard.jsonl"]])!.WaitForExit();
        byte[] before = File.ReadAllBytes(dir["cn.jsonl"]);

        foreach (var output in new[] { dir["cn.jsonl"], dir["sub"] + "/../cn.jsonl", dir["link.jsonl"], dir["dirlink"] + "/cn.jsonl", dir["hard.jsonl"] })
        {
            var e = Assert.Throws<VlmTuneException>(() => OogiriConverter.Convert(dir["cn.jsonl"], output));
            Assert.Contains("is the input file", e.Message);
            Assert.Equal(before, File.ReadAllBytes(dir["cn.jsonl"]));
        }
        // Converting from the link to the real file is the same mistake the other way round.
        Assert.Throws<VlmTuneException>(() => OogiriConverter.Convert(dir["link.jsonl"], dir["cn.jsonl"]));
        Assert.Equal(before, File.ReadAllBytes(dir["cn.jsonl"]));
        Assert.Empty(Directory.GetFiles(dir.Path, "*.tmp-*"));
    }

    [Fact]
    public void ImagesThatAreSymlinksOutOfTheDatasetAreLeftOutWithTheirReason()
    {
        using var outside = new TempDir();
        string secret = outside.Jpeg("secret.jpg", 5, 5);
        using var dir = Dataset(string.Join("\n", Line, Line.Replace("\"a\"", "\"b\""), Line.Replace("\"a\"", "\"c\""), Line.Replace("\"a\"", "\"d\"")) + "\n");
        File.CreateSymbolicLink(dir["images/b.jpg"], secret);                // out of the dataset: refused
        dir.Jpeg("other/c.jpg", 7, 7);
        File.CreateSymbolicLink(dir["images/c.jpg"], "../other/c.jpg");      // inside the dataset folder: fine
        File.CreateSymbolicLink(dir["images/d.jpg"], "../../" + Path.GetFileName(outside.Path) + "/secret.jpg");

        var result = OogiriConverter.Convert(dir["cn.jsonl"], dir["ex.json"]);
        Assert.Equal(2, result.Kept);
        Assert.Equal(2, result.Count(OogiriSkipReason.ImageOutside));
        Assert.Equal([2L, 4L], result.Skipped.Select(s => s.Line));
        Assert.All(result.Skipped, s => Assert.Contains("outside the dataset folder", s.Detail));
        Assert.DoesNotContain("images/b.jpg", File.ReadAllText(dir["ex.json"]));
    }

    [Fact]
    public void AnImagesFolderLinkedToAnotherDiskIsTheDatasetsOwn()
    {
        using var disk = new TempDir();
        disk.Jpeg("pictures/a.jpg", 8, 6);
        using var dir = new TempDir();
        dir.Write("cn.jsonl", Line + "\n");
        Directory.CreateSymbolicLink(dir["images"], disk["pictures"]);
        Assert.Equal(1, OogiriConverter.Convert(dir["cn.jsonl"], dir["ex.json"]).Kept);
    }

    [Fact]
    public void LinesThatAreNotUtf8AreSkippedByNumberNotTurnedIntoReplacementCharacters()
    {
        using var dir = Dataset("");
        var bytes = new List<byte>();
        bytes.AddRange("\uFEFF"u8.ToArray());   // a BOM is fine
        bytes.AddRange(Encoding.UTF8.GetBytes(Line + "\n"));
        bytes.AddRange(Encoding.UTF8.GetBytes(Line.Replace("梗", "bad "))[..^2]);
        bytes.AddRange([0xE6, 0xA2, (byte)'"', (byte)'}', (byte)'\r', (byte)'\n']);   // a cut multi-byte character
        bytes.AddRange(Encoding.UTF8.GetBytes(Line.Replace("梗", "last") + "\n"));
        File.WriteAllBytes(dir["cn.jsonl"], bytes.ToArray());

        var result = OogiriConverter.Convert(dir["cn.jsonl"], dir["ex.json"]);
        Assert.Equal(2, result.Kept);
        var skip = Assert.Single(result.Skipped);
        Assert.Equal((2L, OogiriSkipReason.BadLine), (skip.Line, skip.Reason));
        Assert.Contains("not valid UTF-8", skip.Detail);
        Assert.DoesNotContain('\uFFFD', File.ReadAllText(dir["ex.json"]));

        var strict = Assert.Throws<VlmTuneException>(() => OogiriConverter.Convert(dir["cn.jsonl"], dir["strict.json"], new OogiriOptions { Strict = true }));
        Assert.Contains("cn.jsonl:2: not valid UTF-8", strict.Message);
        Assert.False(File.Exists(dir["strict.json"]));
    }

    [Fact]
    public void TemporariesOfKilledConversionsAreRemoved()
    {
        using var dir = Dataset(Line + "\n");
        string dead = dir.Write(Temporaries.OfDeadProcess("ex.json.tmp-"), "[ {");
        string live = dir.Write(Temporaries.OfLiveProcess("ex.json.tmp-"), "[ {");
        OogiriConverter.Convert(dir["cn.jsonl"], dir["ex.json"]);
        Assert.False(File.Exists(dead));
        Assert.True(File.Exists(live));
    }

    [Fact]
    public async Task TheReportIsNeverWrittenOverTheInputOrTheOutput()
    {
        using var dir = Dataset(Line + "\n");
        byte[] before = File.ReadAllBytes(dir["cn.jsonl"]);
        var (code, _, stderr) = await CliProcess.RunAsync(["data", "convert-oogiri", "--input", dir["cn.jsonl"], "--output", dir["ex.json"], "--report", dir["cn.jsonl"]]);
        Assert.Equal(1, code);
        Assert.Contains("--report", stderr);
        Assert.Contains("is the --input file", stderr);
        Assert.Equal(before, File.ReadAllBytes(dir["cn.jsonl"]));
        Assert.False(File.Exists(dir["ex.json"]));
    }
}
