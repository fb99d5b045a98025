using System.Text.Json;
using VlmTune.Data;
using VlmTune.Tests.Support;
using VlmTune.Text;

namespace VlmTune.Tests.Data;

/// <summary>A generated CLoT-like dataset (InternVL chat records, one image each) with broken samples mixed in.</summary>
public static class ClotLikeData
{
    /// <summary>Line numbers (1-based) of the broken records and what is wrong with each.</summary>
    public static readonly IReadOnlyDictionary<long, DataProblemKind> Broken = new Dictionary<long, DataProblemKind>
    {
        [4] = DataProblemKind.ImageMissing,
        [7] = DataProblemKind.ImageUndecodable,
        [11] = DataProblemKind.PlaceholderMismatch,
        [15] = DataProblemKind.TooLong,
        [18] = DataProblemKind.BadRecord,            // a turn from "robot"
        [22] = DataProblemKind.RolesNotAlternating,
        [26] = DataProblemKind.PathEscapesRoot,
    };

    public const int Records = 30;
    /// <summary>With the tiny model: every sound sample fits, the over-long one does not.</summary>
    public const int MaxLength = 2000;
    public const string UniqueWord = "zebracrossing";

    /// <summary>Writes <c>data.jsonl</c> with images under <c>root/</c> (record 0-based 12 mentions <see cref="UniqueWord"/>).</summary>
    public static string Write(TempDir dir)
    {
        dir.Jpeg("root/images/wide.jpg", 64, 32);
        dir.Jpeg("root/images/square.jpg", 40, 40);
        dir.Write("root/images/corrupt.jpg", "not a jpeg");
        dir.Jpeg("outside.jpg", 8, 8);
        var lines = new List<string>();
        for (var line = 1; line <= Records; line++)
        {
            string image = line % 2 == 0 ? "images/wide.jpg" : "images/square.jpg";
            string question = $"<image>\n请你根据这张图片，讲一个脑洞大开的梗 {line}" + (line == 13 ? " " + UniqueWord : "");
            string answer = $"答案 {line}";
            string turns = $$"""[{"from": "human", "value": {{Json(question)}}}, {"from": "gpt", "value": {{Json(answer)}}}]""";
            Broken.TryGetValue(line, out var kind);
            if (!Broken.ContainsKey(line)) { }
            else if (kind == DataProblemKind.ImageMissing) image = "images/gone.jpg";
            else if (kind == DataProblemKind.ImageUndecodable) image = "images/corrupt.jpg";
            else if (kind == DataProblemKind.PlaceholderMismatch) turns = turns.Replace("<image>\\n", "<image>\\n<image>\\n");
            else if (kind == DataProblemKind.TooLong) turns = $$"""[{"from": "human", "value": {{Json("<image>\n" + string.Join(' ', Enumerable.Range(0, 2500)))}}}, {"from": "gpt", "value": "a"}]""";
            else if (kind == DataProblemKind.BadRecord) turns = turns.Replace("\"gpt\"", "\"robot\"");
            else if (kind == DataProblemKind.RolesNotAlternating) turns = $$"""[{"from": "human", "value": {{Json(question)}}}, {"from": "human", "value": "again"}, {"from": "gpt", "value": "a"}]""";
            else if (kind == DataProblemKind.PathEscapesRoot) image = "../outside.jpg";
            lines.Add($$"""{"id": "clot-{{line}}", "image": "{{image}}", "conversations": {{turns}}}""");
        }
        return dir.Write("root/data.jsonl", string.Join("\n", lines) + "\n");
    }

    private static string Json(string s) => JsonSerializer.Serialize(s, new JsonSerializerOptions { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping });
}

public class DatasetBrowserTests
{
    /// <summary>A stand-in length (characters + 256 per tile) for tests that need no model.</summary>
    private sealed class CharLength : ISampleLengthCounter
    {
        public int Count(IReadOnlyList<ConversationTurn> conversation, IReadOnlyList<int> imageTiles) =>
            conversation.Sum(t => t.Value.Length) + 256 * imageTiles.Sum();
    }

    private static readonly JsonSerializerOptions Json = new() { WriteIndented = true };

    private static async Task<DataSummary> FinishedSummary(DatasetBrowser browser)
    {
        await browser.Scan;
        return browser.Summary();
    }

    /// <summary>Every fact of the browser equals what <see cref="DataValidator.Validate"/> finds: summary and per record.</summary>
    private static async Task AssertSameAsValidate(string data, string? imageRoot, ValidationOptions options)
    {
        var report = DataValidator.Validate(TrainingData.ReadEntries(data, imageRoot), options);
        using var browser = DatasetBrowser.Open(data, imageRoot, options);
        var summary = await FinishedSummary(browser);
        Assert.True(summary.Complete);
        Assert.Null(summary.ScanError);
        Assert.Equal(JsonSerializer.Serialize(DataSummary.Of(report, options), Json), JsonSerializer.Serialize(summary, Json));

        var page = browser.Page(0, 200);
        Assert.Equal(report.Records, page.Samples.Count);
        Assert.Equal(report.Problems.Select(p => (p.Source.Line, p.Kind, p.Message)),
                     page.Samples.SelectMany(s => s.Facts.Problems).Select(p => (p.Source.Line, p.Kind, p.Message)));
        Assert.Equal(report.Lengths, page.Samples.Where(s => s.Facts.Length is not null).Select(s => s.Facts.Length!.Value));
    }

    [Fact]
    public async Task FactsEqualTheValidatorsOnAClotLikeSetWithBrokenSamples()
    {
        using var dir = new TempDir();
        var data = ClotLikeData.Write(dir);
        var options = new ValidationOptions { Length = new CharLength(), MaxLength = 3000 };
        await AssertSameAsValidate(data, null, options);

        using var browser = DatasetBrowser.Open(data, null, options);
        var summary = await FinishedSummary(browser);
        Assert.Equal(ClotLikeData.Records, summary.Records);
        Assert.Equal(ClotLikeData.Broken.Count, summary.Errors);
        Assert.Equal(ClotLikeData.Broken.Values.GroupBy(k => k).ToDictionary(g => g.Key.ToString(), g => (long)g.Count()), summary.ErrorsByKind);
        // 64×32 is 2:1 → 2×1 + thumbnail; 40×40 is one tile.
        Assert.Equal(new[] { 1, 3 }, summary.TilesPerImage.Keys);
        Assert.Equal(summary.Samples, summary.ImagesPerSample[1]);
        Assert.Equal(summary.Measured, summary.Lengths!.Histogram.Sum());
    }

    [FixtureFact]
    public async Task FactsEqualTheValidatorsWithTheTinyModelAndOnTheFixtureData()
    {
        var options = ModelLength.Configure(new ValidationOptions { MaxLength = ClotLikeData.MaxLength }, Fixtures.TinyModel);
        using var dir = new TempDir();
        await AssertSameAsValidate(ClotLikeData.Write(dir), null, options);
        var compared = 0;
        foreach (var file in Directory.EnumerateFiles(Fixtures.Data, "*.jsonl", SearchOption.AllDirectories))
        {
            // XTuner's pretraining example (and CLoT's raw format) hold no chat samples: the browser refuses them at the start.
            if (!TrainingData.ReadEntries(file).Any(e => e.Sample is not null))
            {
                Assert.Throws<VlmTuneException>(() => DatasetBrowser.Open(file, null, options));
                continue;
            }
            await AssertSameAsValidate(file, null, options);
            compared++;
        }
        Assert.True(compared >= 3, $"{compared} fixture files compared");
    }

    [FixtureFact]
    public void DetailHasTrainingsTokensAndLabels()
    {
        using var dir = new TempDir();
        var data = ClotLikeData.Write(dir);
        var options = ModelLength.Configure(new ValidationOptions { MaxLength = ClotLikeData.MaxLength }, Fixtures.TinyModel);
        using var browser = DatasetBrowser.Open(data, null, options);

        var detail = browser.Detail(1)!;   // line 2: the 64×32 image
        var facts = detail.Sample.Facts;
        Assert.Empty(facts.Problems);
        Assert.Equal(new VlmTune.Vision.TileGrid(2, 1, true), detail.Grids.Single());
        var tokens = detail.Tokens!;
        Assert.Equal(facts.Length, tokens.FullLength);
        Assert.Equal(256 * 3, tokens.ImageTokens);
        Assert.Equal(tokens.FullLength, tokens.TextTokens + tokens.ImageTokens);
        Assert.False(tokens.Truncated);

        // The spans are training's labels: the same ids and learned positions as ConversationTokenizer gives.
        var length = (TrainingLength)options.Length!;
        var training = length.Tokenize(detail.Sample.Sample!.Conversations, [3], ClotLikeData.MaxLength, "test");
        Assert.Equal(training.SupervisedTokenCount, tokens.SupervisedTokens);
        Assert.Equal(training.SupervisedTokenCount, tokens.Spans.Where(s => s.Learned).Sum(s => s.Tokens));
        Assert.Equal(training.InputIds.Length, tokens.Spans.Sum(s => s.Tokens));
        Assert.Contains("答案 2", string.Concat(tokens.Spans.Where(s => s.Learned).Select(s => s.Text)));
        Assert.DoesNotContain("脑洞", string.Concat(tokens.Spans.Where(s => s.Learned).Select(s => s.Text)));
        Assert.Contains(tokens.Spans, s => s.Image && s.Tokens == 256 * 3 && !s.Learned);

        var tooLong = browser.Detail(14)!.Tokens!;   // line 15
        Assert.True(tooLong.FullLength > ClotLikeData.MaxLength);
        Assert.True(tooLong.Truncated || tooLong.Problem is not null);
        Assert.Null(browser.Detail(ClotLikeData.Records));
    }

    [Fact]
    public async Task ProblemFilterAndSearchFindTheRightRecords()
    {
        using var dir = new TempDir();
        using var browser = DatasetBrowser.Open(ClotLikeData.Write(dir), null, new ValidationOptions { Length = new CharLength(), MaxLength = 3000 });
        await browser.Scan;
        var broken = browser.Page(0, 200, problemsOnly: true);
        Assert.True(broken.Complete);
        Assert.Equal(ClotLikeData.Broken.Keys.Order(), broken.Samples.Select(s => s.Source.Line));
        Assert.Equal(ClotLikeData.Broken.Count, broken.Matched);
        Assert.All(broken.Samples, s => Assert.Equal(ClotLikeData.Broken[s.Source.Line], s.Facts.Problems.Single().Kind));

        var second = browser.Page(3, 3, problemsOnly: true);
        Assert.Equal(broken.Samples.Skip(3).Take(3).Select(s => s.Index), second.Samples.Select(s => s.Index));

        var found = browser.Page(0, 20, search: ClotLikeData.UniqueWord.ToUpperInvariant());
        Assert.Equal(12L, found.Samples.Single().Index);
        Assert.Equal(1, found.Matched);

        var paged = browser.Page(20, 20);
        Assert.Equal(Enumerable.Range(20, 10).Select(i => (long)i), paged.Samples.Select(s => s.Index));
        Assert.Null(paged.Matched);
        Assert.Throws<VlmTuneException>(() => browser.Page(-1, 20));
    }

    [Fact]
    public async Task TheFirstPageAnswersBeforeTheSummaryOf40000SamplesIsDone()
    {
        using var dir = new TempDir();
        dir.Jpeg("a.jpg", 32, 16);
        var line = """{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a picture"}]}""";
        var data = dir.Write("big.jsonl", string.Concat(Enumerable.Repeat(line + "\n", 40_000)));
        using var hold = new ManualResetEventSlim(false);
        using var browser = DatasetBrowser.Open(data, null, new ValidationOptions { Length = new CharLength() }, hold);

        var first = browser.Page(0, 20);   // the background count is held after its first batch: this cannot have waited for it
        Assert.Equal(20, first.Samples.Count);
        Assert.All(first.Samples, s => Assert.Empty(s.Facts.Problems));
        var partial = browser.Summary();
        Assert.False(partial.Complete);
        Assert.True(partial.Records < 40_000);
        var filtered = browser.Page(0, 20, problemsOnly: true);
        Assert.False(filtered.Complete);

        hold.Set();
        var summary = await FinishedSummary(browser);
        Assert.True(summary.Complete);
        Assert.Equal(40_000, summary.Records);
        Assert.Equal(40_000, summary.TilesPerImage[3]);
    }

    [Fact]
    public void AFileThatIsNotADatasetIsOneClearError()
    {
        using var dir = new TempDir();
        var options = new ValidationOptions();
        foreach (var (name, text) in new[] { ("notes.jsonl", "hello world\n"), ("empty.jsonl", "\n\n"), ("notes.txt", "hello"), ("array.json", "[1, 2") })
        {
            var path = dir.Write(name, text);
            var e = Assert.ThrowsAny<VlmTuneException>(() => DatasetBrowser.Open(path, null, options));
            Assert.Contains(name, e.Message);
            Assert.DoesNotContain("\n", e.Message);
        }
        Assert.ThrowsAny<VlmTuneException>(() => DatasetBrowser.Open(dir["missing.jsonl"], null, options));
    }

    [Fact]
    public void ImagesOutsideTheRootAreNeverServed()
    {
        using var dir = new TempDir();
        var data = ClotLikeData.Write(dir);
        File.CreateSymbolicLink(dir["root/images/link.jpg"], dir["outside.jpg"]);
        File.AppendAllText(data, """{"image": "images/link.jpg", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}""" + "\n");
        using var browser = DatasetBrowser.Open(data, null, new ValidationOptions());

        Assert.Equal(dir["root/images/wide.jpg"], browser.ImagePath(1, 0));
        var escape = Assert.Throws<VlmTuneException>(() => browser.ImagePath(25, 0));   // line 26: ../outside.jpg
        Assert.Contains("leaves the image root", escape.Message);
        var link = Assert.Throws<VlmTuneException>(() => browser.ImagePath(ClotLikeData.Records, 0));
        Assert.Contains("symlink", link.Message);
        Assert.Throws<KeyNotFoundException>(() => browser.ImagePath(1, 1));
        Assert.Throws<KeyNotFoundException>(() => browser.ImagePath(ClotLikeData.Records + 1, 0));
    }
}
