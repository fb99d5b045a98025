using System.Text;
using VlmTune.Data;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Data;

public class TrainingDataTests
{
    /// <summary>The same four samples (single image, two images, text-only, system + leading-gpt) in every format.</summary>
    private static TempDir MakeFormats()
    {
        var dir = new TempDir();
        dir.Jpeg("imgs/a.jpg", 32, 16);
        dir.Jpeg("imgs/b.jpg", 16, 32);
        var internvl = new[]
        {
            """{"id": 0, "image": "imgs/a.jpg", "conversations": [{"from": "human", "value": "<image>\n图里是什么？"}, {"from": "gpt", "value": "一只猫"}]}""",
            """{"id": 1, "image": ["imgs/a.jpg", "imgs/b.jpg"], "conversations": [{"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Same."}, {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}""",
            """{"id": 2, "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}""",
            """{"id": 3, "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}""",
        };
        dir.Write("chat.jsonl", string.Join("\n", internvl) + "\n");
        dir.Write("chat.json", "[\n" + string.Join(",\n", internvl.Select(l => "  " + l)) + "\n]\n");
        var messages = new[]
        {
            """{"id": 0, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/a.jpg"}}, {"type": "text", "text": "图里是什么？"}]}, {"role": "assistant", "content": "一只猫"}]}""",
            """{"id": 1, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/a.jpg", "image_wh": [32, 16]}}, {"type": "image_url", "image_url": {"url": "imgs/b.jpg"}}, {"type": "text", "text": "<IMG_CONTEXT>\n<IMG_CONTEXT>\nCompare."}]}, {"role": "assistant", "content": "Same."}, {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]}""",
            """{"id": 2, "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}""",
            """{"id": 3, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}""",
        };
        dir.Write("messages.jsonl", string.Join("\n", messages) + "\n");
        dir.Write("meta.json", """{"chat": {"root": ".", "annotation": "chat.jsonl", "data_augment": false, "repeat_time": 1, "length": 4}}""");
        return dir;
    }

    private static string Describe(TrainingSample s, string root) =>
        $"{s.Id}|{string.Join(",", s.Images.Select(i => Path.GetRelativePath(root, i)))}|{string.Join("‖", s.Conversations.Select(t => t.From + ":" + t.Value))}";

    [Theory]
    [InlineData("chat.json")]
    [InlineData("chat.jsonl")]
    [InlineData("messages.jsonl")]
    [InlineData("meta.json")]
    public void EveryFormatLoadsTheSameSamples(string file)
    {
        using var dir = MakeFormats();
        var samples = TrainingData.Read(dir[file]).Select(s => Describe(s, dir.Path)).ToArray();
        Assert.Equal(new[]
        {
            "0|imgs/a.jpg|human:<image>\n图里是什么？‖gpt:一只猫",
            "1|imgs/a.jpg,imgs/b.jpg|human:<image>\n<image>\nCompare.‖gpt:Same.‖human:Sure?‖gpt:Yes.",
            "2||human:2+2?‖gpt:4",
            "3||system:Be brief.‖human:Hi‖gpt:Hello",
        }, samples);
    }

    [Fact]
    public void JsonLinesThatAreNotUtf8AreBadRecordsNotReplacementCharacters()
    {
        using var dir = new TempDir();
        var good = Encoding.UTF8.GetBytes("""{"id": 0, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}""" + "\n");
        byte[] bad = [.. Encoding.UTF8.GetBytes("{\"id\": 1, \"conversations\": [{\"from\": \"human\", \"value\": \"Hi "), 0xE6, 0xA2,
            .. Encoding.UTF8.GetBytes("\"}, {\"from\": \"gpt\", \"value\": \"Hello\"}]}\n")];
        File.WriteAllBytes(dir["data.jsonl"], [.. good, .. bad, .. good]);

        var entries = TrainingData.ReadEntries(dir["data.jsonl"]).ToList();
        Assert.Equal(3, entries.Count);
        Assert.NotNull(entries[0].Sample);
        Assert.NotNull(entries[2].Sample);
        var problem = entries[1].Problem!;
        Assert.Equal(DataProblemKind.BadJson, problem.Kind);
        Assert.Equal(2, problem.Source.Line);
        Assert.Contains("not valid UTF-8", problem.Message);
        Assert.Equal(3, TrainingData.CountRecords(dir["data.jsonl"]));   // still a record, as InternVL counts lines
    }

    [Fact]
    public void SourcesNameFileLineAndIndex()
    {
        using var dir = MakeFormats();
        var array = TrainingData.Read(dir["chat.json"]).ToArray();
        Assert.Equal(new long[] { 2, 3, 4, 5 }, array.Select(s => s.Source.Line));
        Assert.Equal(new long[] { 0, 1, 2, 3 }, array.Select(s => s.Source.Index));
        Assert.Equal(dir["chat.json"], array[0].Source.File);
        var lines = TrainingData.Read(dir["chat.jsonl"]).ToArray();
        Assert.Equal(new long[] { 1, 2, 3, 4 }, lines.Select(s => s.Source.Line));
    }

    [Fact]
    public void MetaFileRepeatsAndTakesFractions()
    {
        using var dir = MakeFormats();
        dir.Write("five.jsonl", string.Join("\n", Enumerable.Range(0, 5).Select(i =>
            $$"""{"id": {{i}}, "conversations": [{"from": "human", "value": "q{{i}}"}, {"from": "gpt", "value": "a{{i}}"}]}""")));
        dir.Write("meta.json", """
            {
              "half": {"root": ".", "annotation": "five.jsonl", "data_augment": false, "repeat_time": 0.5, "length": 5},
              "triple": {"root": "./", "annotation": "chat.jsonl", "data_augment": true, "repeat_time": 3, "length": 4, "max_dynamic_patch": 6}
            }
            """);
        var samples = TrainingData.Read(dir["meta.json"]).ToArray();
        // int(5 * 0.5) = 2 records from the front, then chat.jsonl three times over.
        Assert.Equal(new[] { "0", "1" }, samples.Take(2).Select(s => s.Id));
        Assert.Equal(Enumerable.Repeat(new[] { "0", "1", "2", "3" }, 3).SelectMany(x => x), samples.Skip(2).Select(s => s.Id));
        Assert.All(samples.Take(2), s => Assert.Equal("half", s.Dataset));
        Assert.All(samples.Skip(2), s => Assert.Equal(6, s.MaxDynamicPatch));

        var datasets = MetaFile.Load(dir["meta.json"]);
        Assert.Equal(0.5, datasets[0].RepeatTime);
        Assert.Equal(dir["five.jsonl"], datasets[0].Annotation);
        Assert.True(datasets[1].DataAugment);
    }

    [Fact]
    public void MetaFileProblemsAreReportedTogether()
    {
        using var dir = MakeFormats();
        dir.Write("bad-meta.json", """
            {
              "a": {"root": ".", "annotation": "missing.jsonl", "repeat_time": 1},
              "b": {"root": ".", "annotation": "chat.jsonl", "repeat_time": 1.5},
              "c": {"annotation": "chat.jsonl", "repeat_time": 1}
            }
            """);
        var e = Assert.Throws<VlmTuneException>(() => TrainingData.Read(dir["bad-meta.json"]).ToList());
        Assert.Contains("missing.jsonl does not exist", e.Message);
        Assert.Contains("'b'.repeat_time is 1.5", e.Message);
        Assert.Contains("'c' needs 'root'", e.Message);
    }

    [Fact]
    public void InternVLConventionsAreApplied()
    {
        using var dir = new TempDir();
        dir.Jpeg("x.jpg", 8, 8);
        dir.Write("d.jsonl", string.Join("\n",
            // One image without a placeholder: InternVL puts "<image>\n" before the first question.
            """{"image": "x.jpg", "conversations": [{"from": "human", "value": "what?"}, {"from": "gpt", "value": "a dot"}]}""",
            // A leading gpt turn has no question and is dropped.
            """{"conversations": [{"from": "gpt", "value": "orphan"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}""",
            // Empty image string and empty list mean text-only.
            """{"image": "", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}""",
            """{"image": [], "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"""));
        var s = TrainingData.Read(dir["d.jsonl"]).ToArray();
        Assert.Equal("<image>\nwhat?", s[0].Conversations[0].Value);
        Assert.Equal("d.jsonl#0", s[0].Id);
        Assert.Equal(new[] { "human", "gpt" }, s[1].Conversations.Select(t => t.From));
        Assert.Empty(s[2].Images);
        Assert.Empty(s[3].Images);
    }

    [Fact]
    public void ImagePathsMayNotLeaveTheRoot()
    {
        using var dir = new TempDir();
        dir.Jpeg("root/in/x.jpg", 8, 8);
        dir.Jpeg("outside/secret.jpg", 8, 8);
        Directory.CreateSymbolicLink(dir["root/link"], dir["outside"]);
        File.CreateSymbolicLink(dir["root/file-link.jpg"], dir["outside/secret.jpg"]);
        File.CreateSymbolicLink(dir["root/inner-link.jpg"], dir["root/in/x.jpg"]);
        var images = new ImagePaths(dir["root"]);

        Assert.Equal(dir["root/in/x.jpg"], images.Resolve("in/x.jpg").Path);
        Assert.Equal(dir["root/in/x.jpg"], images.Resolve("in/../in/x.jpg").Path); // .. that stays inside is fine
        Assert.NotNull(images.Resolve("inner-link.jpg").Path); // a link to a file inside is fine
        Assert.Contains("through '..'", images.Resolve("../outside/secret.jpg").Error);
        Assert.Contains("absolute", images.Resolve(dir["root/in/x.jpg"]).Error);
        Assert.Contains("absolute", images.Resolve("/etc/passwd").Error);
        Assert.Contains("symlink", images.Resolve("link/secret.jpg").Error);
        Assert.Contains("symlink", images.Resolve("file-link.jpg").Error);

        dir.Write("root/d.jsonl", """{"image": "../outside/secret.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}""");
        var entry = TrainingData.ReadEntries(dir["root/d.jsonl"]).Single();
        Assert.Equal(DataProblemKind.PathEscapesRoot, entry.Problem!.Kind);
        var e = Assert.Throws<DataFormatException>(() => TrainingData.Read(dir["root/d.jsonl"]).ToList());
        Assert.Contains("d.jsonl:1", e.Message);
    }

    [Fact]
    public void ReadingStreams()
    {
        // The files end in garbage: a loader that parsed whole files would fail before giving the first sample.
        using var dir = new TempDir();
        var record = """{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}""";
        dir.Write("a.json", "[" + record + ",\n" + record + ",\n{{{ garbage");
        dir.Write("a.jsonl", record + "\n" + record + "\n{{{ garbage\n");
        Assert.Equal(2, TrainingData.Read(dir["a.json"]).Take(2).Count());
        Assert.Equal(2, TrainingData.Read(dir["a.jsonl"]).Take(2).Count());

        var arrayEntries = TrainingData.ReadEntries(dir["a.json"]).ToArray();
        Assert.Equal(3, arrayEntries.Length);
        Assert.Equal(DataProblemKind.BadJson, arrayEntries[2].Problem!.Kind);
        Assert.Equal(3, arrayEntries[2].Problem!.Source.Line);
        dir.Write("tail.json", "[" + record + "]\n\n" + record + "\n");
        var tail = TrainingData.ReadEntries(dir["tail.json"]).ToArray();
        Assert.Equal(2, tail.Length);
        Assert.Contains("after the closing ']'", tail[1].Problem!.Message);
        Assert.Equal(3, tail[1].Problem!.Source.Line);
        var lineEntries = TrainingData.ReadEntries(dir["a.jsonl"]).ToArray();
        Assert.Equal(3, lineEntries[2].Problem!.Source.Line);
    }

    [Fact]
    public void ArrayRecordsLargerThanTheReadBufferAreWhole()
    {
        using var dir = new TempDir();
        var big = new string('字', 100_000); // 300 KB of UTF-8 in one value, several read buffers long
        var text = new StringBuilder("\uFEFF[\n");
        for (var i = 0; i < 3; i++)
            text.Append(i > 0 ? ",\n" : "").Append($$"""  {"id": "r{{i}}", "conversations": [{"from": "human", "value": "{{big}}"}, {"from": "gpt", "value": "{{i}}\n"}]}""");
        text.Append("\n]");
        dir.Write("big.json", text.ToString());
        var samples = TrainingData.Read(dir["big.json"]).ToArray();
        Assert.Equal(new[] { "r0", "r1", "r2" }, samples.Select(s => s.Id));
        Assert.All(samples, s => Assert.Equal(big, s.Conversations[0].Value));
        Assert.Equal(new long[] { 2, 3, 4 }, samples.Select(s => s.Source.Line));
        Assert.Equal(3, TrainingData.CountRecords(dir["big.json"]));
    }

    [Fact]
    public void BadRecordsNameTheFieldAtFault()
    {
        using var dir = new TempDir();
        dir.Write("d.jsonl", string.Join("\n",
            """{"conversations": [{"from": "user", "value": "q"}]}""",
            """{"conversations": [{"from": "human"}]}""",
            """{"image": 5, "conversations": [{"from": "human", "value": "q"}]}""",
            """{"question": "q"}""",
            """{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.jpg"}}]}]}""",
            """{"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v.mp4"}}]}]}""",
            """{"conversations": [{"from": "human", "value": "half an emoji \ud83d"}, {"from": "gpt", "value": "a"}]}"""));
        var problems = TrainingData.ReadEntries(dir["d.jsonl"]).Select(e => e.Problem!).ToArray();
        Assert.All(problems, p => Assert.Equal(DataProblemKind.BadRecord, p.Kind));
        Assert.Contains("conversations[0].from is 'user'", problems[0].Message);
        Assert.Contains("conversations[0] has no 'value'", problems[1].Message);
        Assert.Contains("'image' must be a path", problems[2].Message);
        Assert.Contains("needs 'conversations'", problems[3].Message);
        Assert.Contains("not a local file", problems[4].Message);
        Assert.Contains("only 'text' and 'image_url'", problems[5].Message);
        Assert.Contains("not valid text", problems[6].Message);
    }

    [FixtureTheory]
    [InlineData("xtuner_mllm_sft_single_image_example_data.jsonl", 22, 1)]
    [InlineData("xtuner_mllm_sft_multi_image_example_data.jsonl", 11, 2)]
    [InlineData("xtuner_mllm_sft_text_example_data.jsonl", 200, 0)]
    public void LoadsXTunerExamples(string file, int count, int imagesPerSample)
    {
        var samples = TrainingData.Read(Path.Combine(Fixtures.Data, "xtuner", file), Path.Combine(Fixtures.Data, "images")).ToArray();
        Assert.Equal(count, samples.Length);
        Assert.All(samples, s =>
        {
            Assert.Equal(imagesPerSample, s.Images.Count);
            Assert.Equal(s.Images.Count, s.PlaceholderCount());
            Assert.Null(DataValidator.RoleError(s.Conversations));
            Assert.DoesNotContain(s.Conversations, t => t.Value.Contains("<IMG_CONTEXT>"));
        });
        if (imagesPerSample == 2)
            Assert.Equal("<image>\n<image>\n两张图片有啥相同之处？", samples[0].Conversations[0].Value);
    }

    [FixtureFact]
    public void XTunerPretrainDataIsRejectedClearly()
    {
        var entries = TrainingData.ReadEntries(Path.Combine(Fixtures.Data, "xtuner", "xtuner_mllm_pretrain_image_example_data.jsonl")).ToArray();
        Assert.Equal(12, entries.Length);
        Assert.All(entries, e => Assert.Contains("'pretrain'", e.Problem!.Message));
    }

    [FixtureFact]
    public void LoadsTheClotInternVLRecords()
    {
        var samples = TrainingData.Read(Path.Combine(Fixtures.Data, "clot", "clot_cn_2000_records_internvl_format.jsonl")).ToArray();
        Assert.Equal(3, samples.Length);
        Assert.EndsWith("ex_images/007aPnLRgy1h9bhf3l6i9j30ci0eldh5.jpg", samples[0].Images.Single());
        Assert.Equal("<image>\n请你根据这张图片，讲一个脑洞大开的梗", samples[0].Conversations[0].Value);
    }
}
