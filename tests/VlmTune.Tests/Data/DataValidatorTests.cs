using VlmTune.Data;
using VlmTune.Tests.Support;
using VlmTune.Text;

namespace VlmTune.Tests.Data;

public class DataValidatorTests
{
    /// <summary>
    /// A stand-in length: characters of the turns plus 256 per tile, so the test can predict it; it records the tiles
    /// it was given. The real count (model tokenizer) is checked in <see cref="TrainingLengthIsTheTrainingTokenizersFullLength"/>.
    /// </summary>
    private sealed class CharLength : ISampleLengthCounter
    {
        public List<int[]> Tiles { get; } = new();

        public int Count(IReadOnlyList<ConversationTurn> conversation, IReadOnlyList<int> imageTiles)
        {
            Tiles.Add(imageTiles.ToArray());
            return conversation.Sum(t => t.Value.Length) + 256 * imageTiles.Sum();
        }
    }

    private static TempDir MakePlantedDefects()
    {
        var dir = new TempDir();
        dir.Jpeg("root/a.jpg", 32, 16);
        dir.Jpeg("root/b.jpg", 16, 16);
        dir.Write("root/garbage.jpg", "this is not an image");
        var real = DataTestFiles.JpegBytes(64, 64);
        File.WriteAllBytes(dir["root/truncated.jpg"], real[..(real.Length / 2)]);
        dir.Jpeg("outside.jpg", 8, 8);
        dir.Write("data.jsonl", string.Join("\n",
            """{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}""",                        // 1 ok
            """{"image": "a.jpg", "conversations": [{"from": "human" """,                                                                                 // 2 bad JSON
            """{"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}""",                  // 3 roles
            """{"image": ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}""",             // 4 placeholders
            """{"image": "missing.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}""",                           // 5 missing
            """{"image": "garbage.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}""",                           // 6 undecodable
            """{"image": "truncated.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}""",                         // 7 truncated
            """{"image": "../outside.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}""",                        // 8 escapes
            $$"""{"conversations": [{"from": "human", "value": "{{string.Join(' ', Enumerable.Range(0, 2500))}}"}, {"from": "gpt", "value": "a"}]}""",                         // 9 too long
            """{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}""") + "\n");                                          // 10 ok
        return dir;
    }

    [Fact]
    public void FindsEachPlantedDefect()
    {
        using var dir = MakePlantedDefects();
        var options = new ValidationOptions { Length = new CharLength(), MaxLength = 2000 };
        var report = DataValidator.Validate(TrainingData.ReadEntries(dir["data.jsonl"], dir["root"]), options);

        Assert.Equal(10, report.Records);
        Assert.Equal(8, report.Samples); // bad JSON and the escaping path never become samples
        var found = report.Problems.Select(p => (p.Source.Line, p.Kind)).ToArray();
        Assert.Equal(new[]
        {
            (2L, DataProblemKind.BadJson),
            (3L, DataProblemKind.RolesNotAlternating),
            (4L, DataProblemKind.PlaceholderMismatch),
            (5L, DataProblemKind.ImageMissing),
            (6L, DataProblemKind.ImageUndecodable),
            (7L, DataProblemKind.ImageUndecodable),
            (8L, DataProblemKind.PathEscapesRoot),
            (9L, DataProblemKind.TooLong),
        }, found);
        Assert.Equal(8, report.ErrorCount);
        Assert.Equal(1, report.TooLong);
        Assert.Contains("1 <image> placeholder(s) for 2 image(s)", report.Problems[2].Message);
    }

    [Fact]
    public void TilesComeFromTheRealImageSize()
    {
        using var dir = MakePlantedDefects();
        var length = new CharLength();
        var report = DataValidator.Validate(TrainingData.ReadEntries(dir["data.jsonl"], dir["root"]).Take(1), new ValidationOptions { Length = length });
        // 32×16 is 2:1 → a 2×1 grid plus the thumbnail = 3 tiles.
        Assert.Equal(new[] { 3 }, length.Tiles.Single());
        Assert.Equal("<image>\nq".Length + "a".Length + 3 * 256, report.Lengths.Single());
    }

    [Fact]
    public void MultiImageSamplesShareTheTileBudget()
    {
        using var dir = new TempDir();
        dir.Jpeg("w.jpg", 64, 8); // 8:1 would want 8 tiles; with two images each gets at most 12 / 2 = 6
        dir.Write("d.jsonl", """{"image": ["w.jpg", "w.jpg"], "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "a"}]}""");
        var length = new CharLength();
        DataValidator.Validate(TrainingData.ReadEntries(dir["d.jsonl"]), new ValidationOptions { Length = length, UseThumbnail = false });
        Assert.Equal(new[] { 6, 6 }, length.Tiles.Single());
    }

    [FixtureFact]
    public void TrainingLengthIsTheTrainingTokenizersFullLength()
    {
        var tokenizer = TextTokenizer.Load(Fixtures.TinyModel);
        var length = new TrainingLength(tokenizer, ConversationTemplate.InternLM2Chat, numImageToken: 256);
        var training = new ConversationTokenizer(tokenizer, ConversationTemplate.InternLM2Chat, numImageToken: 256, maxLength: 100_000);
        ConversationTurn[] conversation =
        [
            new("system", "Be brief."), new("human", "<image>\n<image>\n两张图有什么不同？"), new("gpt", "A cat and a dog."),
            new("human", "Sure?"), new("gpt", "Yes."),
        ];
        int[] tiles = [7, 1];
        Assert.Equal(training.Tokenize(conversation, tiles).FullLength, length.Count(conversation, tiles));
        Assert.Equal(training.Tokenize(conversation[..3], [3, 5]).FullLength, length.Count(conversation[..3], [3, 5]));
    }

    [Fact]
    public void ImageCacheIsBoundedAndRefilled()
    {
        using var dir = new TempDir();
        for (var i = 0; i < 3; i++) dir.Jpeg($"{i}.jpg", 8 + i, 8);
        dir.Write("d.jsonl", string.Join("\n", Enumerable.Range(0, 600).Select(i =>
            $$"""{"image": "{{i % 3}}.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}""")));
        var report = DataValidator.Validate(TrainingData.ReadEntries(dir["d.jsonl"]), new ValidationOptions { ImageCacheSize = 1 });
        Assert.Equal(600, report.Samples);
        Assert.Equal(0, report.ErrorCount);
    }

    private sealed class Refusing : ISampleLengthCounter
    {
        public int Count(IReadOnlyList<ConversationTurn> conversation, IReadOnlyList<int> imageTiles) =>
            throw new VlmTuneException("cannot render this");
    }

    [Fact]
    public void ProblemsFoundWhileMeasuringAreReportedNotThrown()
    {
        using var dir = new TempDir();
        dir.Jpeg("x.jpg", 8, 8);
        dir.Write("d.jsonl", """{"image": ["x.jpg", "x.jpg", "x.jpg"], "conversations": [{"from": "human", "value": "<image><image><image>"}, {"from": "gpt", "value": "a"}]}""" + "\n" +
                             """{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}""");
        var report = DataValidator.Validate(TrainingData.ReadEntries(dir["d.jsonl"]),
            new ValidationOptions { Length = new Refusing(), MinTiles = 2, MaxTiles = 4 });
        Assert.Equal(2, report.ErrorsByKind[DataProblemKind.BadRecord]);
        Assert.Contains("below min_dynamic_patch 2", report.Problems[0].Message);
        Assert.Contains("cannot render this", report.Problems[1].Message);
    }

    [Fact]
    public void RoleRules()
    {
        ConversationTurn T(string from) => new(from, "x");
        Assert.Null(DataValidator.RoleError([T("human"), T("gpt")]));
        Assert.Null(DataValidator.RoleError([T("system"), T("human"), T("gpt"), T("human"), T("gpt")]));
        Assert.NotNull(DataValidator.RoleError([T("human"), T("gpt"), T("human")]));
        Assert.NotNull(DataValidator.RoleError([T("human"), T("system"), T("gpt")]));
        Assert.NotNull(DataValidator.RoleError([T("system")]));
    }

    [Fact]
    public void CliExitCodes()
    {
        using var dir = MakePlantedDefects();
        var good = dir.Write("root/good.jsonl", """{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}""" + "\n");
        var (code, output) = Cli("data", "validate", "--data", good);
        Assert.Equal(0, code);
        Assert.Contains("no errors", output);

        (code, output) = Cli("data", "validate", "--data", dir["data.jsonl"], "--image-root", dir["root"]);
        Assert.Equal(1, code);
        Assert.Contains("data.jsonl:5", output);

        Assert.Equal(1, Cli("data", "validate", "--data", good, "--max-length", "10").ExitCode); // needs --model
        Assert.Equal(1, Cli("data", "validate", "--data", dir["nope.jsonl"]).ExitCode);
    }

    [FixtureFact]
    public void MeasuresWithTheModelsTokenizerAndConfig()
    {
        using var dir = MakePlantedDefects();
        var options = ModelLength.Configure(new ValidationOptions { MaxLength = 1000 }, Fixtures.TinyModel);
        Assert.IsType<TrainingLength>(options.Length);
        Assert.Equal(12, options.MaxTiles);
        Assert.True(options.UseThumbnail);
        var report = DataValidator.Validate(TrainingData.ReadEntries(dir["data.jsonl"], dir["root"]), options);
        Assert.Equal(3, report.Lengths.Count); // lines 1, 9 and 10: only samples without other problems are measured
        Assert.True(report.Lengths[0] > 3 * 256 + 2);
        Assert.Equal(1, report.TooLong);

        var (code, _) = Cli("data", "validate", "--data", dir["data.jsonl"], "--image-root", dir["root"],
                                             "--model", Fixtures.TinyModel, "--max-length", "4096");
        Assert.Equal(1, code);
    }

    private static (int ExitCode, string Output) Cli(params string[] args)
    {
        var (code, stdout, stderr) = CliProcess.RunAsync(args, timeoutSeconds: 120).GetAwaiter().GetResult();
        return (code, stdout + stderr);
    }
}
