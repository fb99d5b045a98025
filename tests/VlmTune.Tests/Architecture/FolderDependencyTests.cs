using VlmTune.Tests.Support;

namespace VlmTune.Tests.Architecture;

/// <summary>
/// The folders of src/VlmTune use each other one way only, and exactly as docs/architecture.md draws them: the drawing
/// is the table of allowed arrows, so code and doc cannot drift apart silently. An arrow drawn with ✗ closes a cycle that
/// is known and still to be removed; it is left out of the cycle check for as long as it is drawn.
/// </summary>
public sealed class FolderDependencyTests
{
    private static string SourceRoot => Path.Combine(Fixtures.RepoRoot, "src", "VlmTune");
    private static string ArchitectureDoc => Path.Combine(Fixtures.RepoRoot, "docs", "architecture.md");

    private static readonly Lazy<IReadOnlyList<SourceFile>> Files = new(() => FolderReferences.Files(SourceRoot));
    private static readonly Lazy<IReadOnlyList<FolderReference>> References = new(() => FolderReferences.Read(Files.Value));
    private static readonly Lazy<(IReadOnlyList<string> Folders, IReadOnlyList<DrawnArrow> Arrows)> Drawing =
        new(() => FolderDrawing.Read(File.ReadAllText(ArchitectureDoc)));

    [Fact]
    public void FoldersFormNoCycle()
    {
        var known = Drawing.Value.Arrows.Where(a => a.ClosesCycle).Select(a => (a.From, a.To)).ToHashSet();
        var arrows = ByArrow(References.Value).Where(a => !known.Contains(a.Key)).ToDictionary();
        var cycle = Cycles.Find(arrows.Keys);
        Assert.True(cycle is null, cycle is null ? "" :
            $"src/VlmTune's folders form a cycle, {string.Join(" → ", cycle)}: " +
            string.Join("; ", cycle.Zip(cycle.Skip(1)).Select(a => $"{a.First} → {a.Second} at {Evidence(arrows[a])}")) +
            ". Move what closes it to the folder that owns the concept (docs/architecture.md).");
    }

    [Fact]
    public void CodeUsesExactlyTheArrowsTheDrawingShows()
    {
        var (drawnFolders, drawnArrows) = Drawing.Value;
        var folders = FolderReferences.Folders(SourceRoot);
        var used = ByArrow(References.Value);
        var drawn = drawnArrows.Select(a => (a.From, a.To)).ToHashSet();
        var problems = new List<string>();
        problems.AddRange(folders.Except(drawnFolders).Select(f => $"folder {f} has no line in the drawing"));
        problems.AddRange(drawnFolders.Except(folders).Select(f => $"the drawing names {f}, which is no folder of src/VlmTune"));
        problems.AddRange(drawnFolders.GroupBy(f => f).Where(g => g.Count() > 1).Select(g => $"{g.Key} is drawn {g.Count()} times"));
        problems.AddRange(used.Where(a => !drawn.Contains(a.Key))
            .Select(a => $"{a.Key.From} ──► {a.Key.To} is not drawn: {Evidence(a.Value)}"));
        problems.AddRange(drawn.Where(a => !used.ContainsKey(a))
            .Select(a => $"{a.From} ──► {a.To} is drawn, but no file of {a.From} names VlmTune.{a.To}"));
        // The drawing reads bottom-up: a folder's line comes below the lines of the folders it uses.
        var row = drawnFolders.Select((f, i) => (f, i)).DistinctBy(x => x.f).ToDictionary(x => x.f, x => x.i);
        problems.AddRange(drawnArrows.Where(a => !a.ClosesCycle && row.GetValueOrDefault(a.To) > row.GetValueOrDefault(a.From))
            .Select(a => $"{a.From} ──► {a.To}: {a.To} is drawn below {a.From}; move its line up"));
        // A ✗ is for an arrow that closes a cycle; once the cycle is gone, so must the mark be.
        var plain = drawnArrows.Where(a => !a.ClosesCycle).Select(a => (a.From, a.To)).ToList();
        problems.AddRange(drawnArrows.Where(a => a.ClosesCycle && Cycles.Find([.. plain, (a.From, a.To)]) is null)
            .Select(a => $"{a.From} ──► {a.To} is marked ✗ but closes no cycle; drop the mark"));
        Assert.True(problems.Count == 0, $"{ArchitectureDoc}: the folder drawing and the code disagree:\n  " + string.Join("\n  ", problems));
    }

    [Fact]
    public void EveryFileIsInTheNamespaceOfItsFolder()
    {
        // The drawing is of folders, the references are of namespaces: they are the same only while this holds.
        var misplaced = Files.Value.SelectMany(f => FolderReferences.ForeignNamespaces(f).Select(ns => $"{f.Path} declares namespace {ns}")).ToList();
        Assert.True(misplaced.Count == 0, string.Join("\n", misplaced));
        // A project-wide <Using Include="VlmTune.X"/> would let files use a folder without naming it.
        foreach (var project in new[] { Path.Combine(SourceRoot, "VlmTune.csproj"), Path.Combine(Fixtures.RepoRoot, "Directory.Build.props") })
            Assert.DoesNotMatch(@"<Using\s+Include=""VlmTune\.", File.ReadAllText(project));
    }

    [Fact]
    public void ReferencesAreFoundInEveryFormAndOnlyInCode()
    {
        SourceFile File(string folder, string name, string text) => new(folder, $"{folder}/{name}", text);
        var files = new[]
        {
            File("IO", "OwnedTemporary.cs", "namespace VlmTune.IO;\npublic static class OwnedTemporary { public static string Beside(string p) => p; }"),
            File("Cuda", "CudaDriver.cs", "namespace VlmTune.Cuda;\npublic sealed class CudaDriver { public static CudaDriver Shared = new(); }"),
            File("Hub", "HubApi.cs", "namespace VlmTune.Hub;\npublic sealed class HubApi;"),
            File("Text", "Tokenizer.cs", "namespace VlmTune.Text;\npublic sealed class Tokenizer;"),
            File("Vision", "ImageDecoder.cs", "namespace VlmTune.Vision;\npublic static class ImageDecoder { public static void Decode() { } }"),
            File("Data", "Sample.cs", "namespace VlmTune.Data;\npublic sealed class Sample;"),
            File("Models", "Config.cs", "namespace VlmTune.Models;\npublic sealed record Config(int Vision, int Data);\npublic sealed class Linear;"),
            File("Quantization", "Nf4.cs", "namespace VlmTune.Quantization;\npublic static class Nf4 { public static int BlockSize = 64; }"),
            File("Training", "Trainer.cs", """
                using VlmTune.Models;
                using static VlmTune.Quantization.Nf4;
                using Head = VlmTune.Models.Linear;

                namespace VlmTune.Training;

                /// <summary>Writes <see cref="VlmTune.Hub.HubApi"/>-style files.</summary>
                public sealed class Trainer
                {
                    // VlmTune.Data.Sample is only mentioned here
                    private readonly string _s = "VlmTune.Text.Tokenizer";
                    public string Temp(Config config) => IO.OwnedTemporary.Beside($"{config.Vision}{config.Data}");
                    public object Driver => global::VlmTune.Cuda.CudaDriver.Shared;
                    public void Decode() => VlmTune.Vision.ImageDecoder.Decode();
                }
                """),
        };
        var found = FolderReferences.Read(files).Where(r => r.From == "Training").ToList();
        Assert.Equal(["Cuda", "IO", "Models", "Quantization", "Vision"], found.Select(r => r.To).Distinct().Order());
        Assert.Equal([1, 3], found.Where(r => r.To == "Models").Select(r => r.Line));
        Assert.Equal("Training/Trainer.cs:12 `public string Temp(Config config) => IO.OwnedTemporary.Beside($\"{config.Vision}{config.Data}\");`",
            found.Single(r => r.To == "IO").ToString());
        Assert.Equal(2, found.Single(r => r.To == "Quantization").Line);
        Assert.Equal(["VlmTune.Other"], FolderReferences.ForeignNamespaces(File("Models", "Moved.cs", "namespace VlmTune.Other;\nclass Moved;")));
    }

    [Fact]
    public void TheDrawingReadsAsFoldersArrowsAndMarks()
    {
        const string doc = """
            # Layout
            ```
              VlmTune.Cli ──► VlmTune
              src/VlmTune/
                IO, Text ─────────── (leaves: paths,
                                      tokenizers)
                Models ──► Text                 (the modules)

                Checkpoints ──► Models, IO, Training ✗
                Training ──► Models, Checkpoints
            ```
                NotDrawn ──► Models
            """;
        var (folders, arrows) = FolderDrawing.Read(doc);
        Assert.Equal(["IO", "Text", "Models", "Checkpoints", "Training"], folders);
        Assert.Equal(
        [
            new DrawnArrow("Models", "Text", false), new DrawnArrow("Checkpoints", "Models", false), new DrawnArrow("Checkpoints", "IO", false),
            new DrawnArrow("Checkpoints", "Training", true), new DrawnArrow("Training", "Models", false), new DrawnArrow("Training", "Checkpoints", false),
        ], arrows);
        var e = Assert.Throws<FormatException>(() => FolderDrawing.Read("```\nsrc/VlmTune/\n    Models -> Text\n```"));
        Assert.StartsWith("line 3: 'Models -> Text'", e.Message);
    }

    [Fact]
    public void CyclesAreFoundWithTheirPath()
    {
        Assert.Null(Cycles.Find([("Data", "Models"), ("Training", "Data"), ("Training", "Models")]));
        Assert.Equal(["Checkpoints", "Training", "Checkpoints"], Cycles.Find([("Models", "Text"), ("Checkpoints", "Training"), ("Training", "Checkpoints")]));
        Assert.Equal(["A", "B", "C", "A"], Cycles.Find([("A", "B"), ("B", "C"), ("C", "A")]));
    }

    private static Dictionary<(string From, string To), IReadOnlyList<FolderReference>> ByArrow(IEnumerable<FolderReference> references) =>
        references.GroupBy(r => (r.From, r.To)).ToDictionary(g => g.Key, g => (IReadOnlyList<FolderReference>)g.ToList());

    private static string Evidence(IReadOnlyList<FolderReference> references) =>
        references[0] + (references.Count > 1 ? $" (and {references.Count - 1} more)" : "");
}
