using System.Text.Json;
using VlmTune.Checkpoints;

namespace VlmTune.Tests.Support;

/// <summary>
/// Locates the shared fixtures (../shared/fixtures beside the checkout, or VLMTUNE_FIXTURES). Tests that need them use
/// <see cref="FixtureFactAttribute"/>: skipped with a clear message where absent, but failing under CI (CI=true).
/// </summary>
public static class Fixtures
{
    public static readonly string? Root = FindRoot();

    public static string RepoRoot { get; } = FindRepoRoot();

    public static bool Available => Root is not null;

    public static string TinyModel => Path.Combine(Require(), "tiny-internvl2", "model");
    public static string TinyDir => Path.Combine(Require(), "tiny-internvl2");
    public static string Adapter => Path.Combine(Require(), "tiny-internvl2", "adapter");
    public static string Data => Path.Combine(Require(), "data");
    public static string FullConfig => Path.Combine(Require(), "internvl2-2b", "config.json");

    private static readonly Lazy<JsonDocument> GoldenJsonLazy = new(() => JsonDocument.Parse(File.ReadAllText(Path.Combine(TinyDir, "golden.json"))));
    private static readonly Lazy<SafetensorsFile> GoldenTensorsLazy = new(() => SafetensorsFile.Open(Path.Combine(TinyDir, "golden.safetensors")));

    /// <summary>golden.json of the tiny model (see shared/fixtures/GOLDEN.md).</summary>
    public static JsonElement Golden => GoldenJsonLazy.Value.RootElement;

    /// <summary>A golden case's prompt token ids (golden.json: cases.NAME.prompt_ids).</summary>
    public static int[] PromptIds(string caseName) =>
        Golden.GetProperty("cases").GetProperty(caseName).GetProperty("prompt_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();

    /// <summary>golden.safetensors of the tiny model.</summary>
    public static SafetensorsFile GoldenTensors => GoldenTensorsLazy.Value;

    public static string Require() => Root ?? throw new InvalidOperationException(MissingMessage);

    public static string MissingMessage =>
        "Shared fixtures not found: expected ../shared/fixtures beside the checkout or VLMTUNE_FIXTURES pointing at them.";

    private static string? FindRoot()
    {
        var env = Environment.GetEnvironmentVariable("VLMTUNE_FIXTURES");
        if (!string.IsNullOrEmpty(env)) return Directory.Exists(env) ? Path.GetFullPath(env) : null;
        var candidate = Path.GetFullPath(Path.Combine(FindRepoRoot(), "..", "shared", "fixtures"));
        return Directory.Exists(candidate) ? candidate : null;
    }

    private static string FindRepoRoot()
    {
        // Set by tools/run_gpu_tests.sh: the published GPU test binary runs outside the repository, from its own folder.
        if (Environment.GetEnvironmentVariable("VLMTUNE_REPO_ROOT") is { Length: > 0 } given && File.Exists(Path.Combine(given, "VlmTune.slnx")))
            return Path.GetFullPath(given);
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "VlmTune.slnx"))) return dir.FullName;
        return Directory.GetCurrentDirectory();
    }

    public static bool UnderCi => string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase);
}

/// <summary>A fact that needs the shared fixtures: skipped where they are absent, except under CI where it runs (and fails).</summary>
public sealed class FixtureFactAttribute : FactAttribute
{
    public FixtureFactAttribute()
    {
        if (!Fixtures.Available && !Fixtures.UnderCi) Skip = Fixtures.MissingMessage;
    }
}

/// <summary>A theory that needs the shared fixtures; see <see cref="FixtureFactAttribute"/>.</summary>
public sealed class FixtureTheoryAttribute : TheoryAttribute
{
    public FixtureTheoryAttribute()
    {
        if (!Fixtures.Available && !Fixtures.UnderCi) Skip = Fixtures.MissingMessage;
    }
}
