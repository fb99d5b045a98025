using System.Text.Json;
using VlmTune.Data;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Data;

public class OogiriConverterTests
{
    /// <summary>A CLoT-like dataset with one line for each way a line can be kept or skipped.</summary>
    private static TempDir MakeDataset()
    {
        var dir = new TempDir();
        dir.Jpeg("images/a.jpg", 40, 30);
        dir.Jpeg("images/b.jpg", 17, 41);
        dir.Jpeg("images/c.jpg", 64, 64);
        dir.Jpeg("images/8.jpg", 20, 10);
        dir.Write("cn.jsonl", string.Join("\n",
            """{"type": "I2T", "question": null, "image": "a", "text": "第一个梗", "star": 5}""",   // 1 kept, default prompt
            """{"type": "T2T", "question": "写个梗", "image": null, "text": "文字梗", "star": 3}""", // 2 type
            """{"type": "I2T", "question": "", "image": "b", "text": "He said \"hi\"\n😀"}""",       // 3 kept, empty question
            "",                                                                                       // 4 blank: not a record
            """{"type": "I2T", "question": "这是什么?", "image": "missing", "text": "x"}""",          // 5 missing image
            """{"type": "I2T", "question": null, "image": "c", "text": ""}""",                       // 6 empty text
            """{"type": "I2T", "image": "c", oops""",                                                // 7 bad line
            """{"type": "IT2T", "question": "配文", "image": "c", "text": "图文梗"}""",               // 8 type (default keeps I2T only)
            """{"type": "I2T", "question": "自定义问题", "image": 8, "text": "数字名"}""",            // 9 kept, numeric image name
            "[1, 2]") + "\n");                                                                        // 10 bad line: not an object
        return dir;
    }

    private const string ExpectedJson = """
        [
            {
                "id": 0,
                "image": "images/a.jpg",
                "width": 40,
                "height": 30,
                "conversations": [
                    {
                        "from": "human",
                        "value": "<image>\n请你根据这张图片,讲一个脑洞大开的梗。"
                    },
                    {
                        "from": "gpt",
                        "value": "第一个梗"
                    }
                ]
            },
            {
                "id": 1,
                "image": "images/b.jpg",
                "width": 17,
                "height": 41,
                "conversations": [
                    {
                        "from": "human",
                        "value": "<image>\n请你根据这张图片,讲一个脑洞大开的梗。"
                    },
                    {
                        "from": "gpt",
                        "value": "He said \"hi\"\n😀"
                    }
                ]
            },
            {
                "id": 2,
                "image": "images/8.jpg",
                "width": 20,
                "height": 10,
                "conversations": [
                    {
                        "from": "human",
                        "value": "<image>\n自定义问题"
                    },
                    {
                        "from": "gpt",
                        "value": "数字名"
                    }
                ]
            }
        ]

        """;

    [Fact]
    public void ConvertsEveryKeptLineAndCountsEverySkipReason()
    {
        using var dir = MakeDataset();
        var result = OogiriConverter.Convert(dir["cn.jsonl"], dir["ex_cn.json"]);

        Assert.Equal(ExpectedJson, File.ReadAllText(dir["ex_cn.json"]));
        Assert.Equal(9, result.Read);
        Assert.Equal(3, result.Kept);
        Assert.Equal(2, result.Count(OogiriSkipReason.Type));
        Assert.Equal(1, result.Count(OogiriSkipReason.MissingImage));
        Assert.Equal(1, result.Count(OogiriSkipReason.EmptyText));
        Assert.Equal(2, result.Count(OogiriSkipReason.BadLine));
        Assert.Equal(new long[] { 2, 5, 6, 7, 8, 10 }, result.Skipped.Select(s => s.Line));
        Assert.Empty(Directory.GetFiles(dir.Path, "*.tmp-*")); // written through a temp file that is gone
    }

    [Fact]
    public void WritesJsonLinesByExtension()
    {
        using var dir = MakeDataset();
        OogiriConverter.Convert(dir["cn.jsonl"], dir["out/ex_cn.jsonl"]);
        var lines = File.ReadAllLines(dir["out/ex_cn.jsonl"]);
        Assert.Equal(3, lines.Length);
        Assert.Equal("""{"id":1,"image":"images/b.jpg","width":17,"height":41,"conversations":[{"from":"human","value":"<image>\n请你根据这张图片,讲一个脑洞大开的梗。"},{"from":"gpt","value":"He said \"hi\"\n😀"}]}""", lines[1]);
        // Each line is the same record as the array element.
        using var array = JsonDocument.Parse(ExpectedJson);
        for (var i = 0; i < 3; i++)
            Assert.Equal(array.RootElement[i].GetRawText().Replace(" ", "").Replace("\n", ""),
                         JsonDocument.Parse(lines[i]).RootElement.GetRawText().Replace(" ", ""));
    }

    [Fact]
    public void TypesAndPromptCanBeChosen()
    {
        using var dir = MakeDataset();
        var options = new OogiriOptions { Types = new HashSet<string> { "I2T", "IT2T" }, Prompt = "讲个笑话" };
        var result = OogiriConverter.Convert(dir["cn.jsonl"], dir["ex.json"], options);
        Assert.Equal(4, result.Kept);
        Assert.Equal(1, result.Count(OogiriSkipReason.Type));
        var records = JsonDocument.Parse(File.ReadAllText(dir["ex.json"])).RootElement;
        Assert.Equal("<image>\n讲个笑话", records[0].GetProperty("conversations")[0].GetProperty("value").GetString());
        Assert.Equal("<image>\n配文", records[2].GetProperty("conversations")[0].GetProperty("value").GetString());
        Assert.Equal(3, records[3].GetProperty("id").GetInt32());
    }

    [Fact]
    public void StrictFailsAtTheFirstMalformedLineAndWritesNothing()
    {
        using var dir = MakeDataset();
        var e = Assert.Throws<VlmTuneException>(() =>
            OogiriConverter.Convert(dir["cn.jsonl"], dir["ex_cn.json"], new OogiriOptions { Strict = true }));
        Assert.Contains("cn.jsonl:7:", e.Message);
        Assert.False(File.Exists(dir["ex_cn.json"]));
        Assert.Empty(Directory.GetFiles(dir.Path, "*.tmp-*"));
    }

    [Fact]
    public void CliWritesTheReportAndReturnsExitCodes()
    {
        using var dir = MakeDataset();
        var (code, output) = Cli("data", "convert-oogiri", "--input", dir["cn.jsonl"], "--output", dir["ex_cn.json"], "--report", dir["skipped.tsv"]);
        Assert.Equal(0, code);
        Assert.Contains("kept 3", output);
        Assert.Equal(ExpectedJson, File.ReadAllText(dir["ex_cn.json"]));
        var report = File.ReadAllLines(dir["skipped.tsv"]).Skip(2).Select(l => string.Join('\t', l.Split('\t').Take(2))).ToArray();
        Assert.Equal(new[] { "2\ttype", "5\tmissing image", "6\tempty text", "7\tbad line", "8\ttype", "10\tbad line" }, report);
        Assert.Contains("images/missing.jpg not found", File.ReadAllText(dir["skipped.tsv"]));

        Assert.Equal(1, Cli("data", "convert-oogiri", "--input", dir["cn.jsonl"], "--output", dir["s.json"], "--strict").ExitCode);
        Assert.Equal(1, Cli("data", "convert-oogiri", "--input", dir["nope.jsonl"], "--output", dir["s.json"]).ExitCode);
        Assert.Equal(0, Cli("data", "convert-oogiri", "--input", dir["cn.jsonl"], "--output", dir["t.json"], "--types", "I2T,IT2T").ExitCode);
        Assert.Equal(4, JsonDocument.Parse(File.ReadAllText(dir["t.json"])).RootElement.GetArrayLength());
    }

    [Fact]
    public void UnpairedSurrogateEscapesAreBadLines()
    {
        using var dir = new TempDir();
        dir.Jpeg("images/a.jpg", 8, 8);
        dir.Write("cn.jsonl", """
            {"type": "I2T", "question": null, "image": "a", "text": "broken \ud83d emoji"}
            {"type": "I2T", "question": null, "image": "a", "text": "whole \ud83d\ude02 emoji"}
            """);
        var result = OogiriConverter.Convert(dir["cn.jsonl"], dir["ex.json"]);
        Assert.Equal(1, result.Kept);
        Assert.Equal((1L, OogiriSkipReason.BadLine), (result.Skipped.Single().Line, result.Skipped.Single().Reason));
        Assert.Contains("whole 😂 emoji", File.ReadAllText(dir["ex.json"]));
    }

    [FixtureFact]
    public void ConvertsTheRealRawExampleLine()
    {
        using var dir = new TempDir();
        var raw = File.ReadAllText(Path.Combine(Fixtures.Data, "clot", "oogiri_go_raw_format_example.jsonl"));
        dir.Write("cn.jsonl", raw);
        Directory.CreateDirectory(dir["images"]);
        File.Copy(Path.Combine(Fixtures.Data, "clot", "007aPnLRgy1h9bhf3l6i9j30ci0eldh5.jpg"), dir["images/5651380.jpg"]);
        var result = OogiriConverter.Convert(dir["cn.jsonl"], dir["ex_cn.json"]);
        Assert.Equal(1, result.Kept);
        var record = JsonDocument.Parse(File.ReadAllText(dir["ex_cn.json"])).RootElement[0];
        Assert.Equal("images/5651380.jpg", record.GetProperty("image").GetString());
        Assert.Equal((450, 444), (record.GetProperty("width").GetInt32(), record.GetProperty("height").GetInt32()));
        Assert.Equal("It wasn't on purpose, I'm sorry!", record.GetProperty("conversations")[1].GetProperty("value").GetString());
    }

    private static (int ExitCode, string Output) Cli(params string[] args)
    {
        var (code, stdout, stderr) = CliProcess.RunAsync(args, timeoutSeconds: 120).GetAwaiter().GetResult();
        return (code, stdout + stderr);
    }
}
