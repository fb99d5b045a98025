using System.Text.Json;
using VlmTune.Checkpoints;

namespace VlmTune.Tests.Support;

/// <summary>
/// The tiny checkpoints of the other InternVL LLM families in tests/fixtures/families (Qwen2, Qwen3, Llama, Phi-3), with
/// goldens from the official InternVL code made by tools/make_family_goldens.py. Each variant folder holds model/
/// (weights, config.json, the small tokenizer files), adapter/ (a PEFT adapter), golden.json and golden.safetensors.
/// </summary>
public static class FamilyFixtures
{
    public static string Root => Path.Combine(Fixtures.RepoRoot, "tests", "fixtures", "families");

    public static string Dir(string variant) => Path.Combine(Root, variant);

    /// <summary>The model folder as committed: enough for the weights; the tokenizer's large files are not there.</summary>
    public static string ModelDir(string variant) => Path.Combine(Dir(variant), "model");

    public static string AdapterDir(string variant) => Path.Combine(Dir(variant), "adapter");

    /// <summary>
    /// A complete model folder in a new temporary directory (the caller deletes it): the committed files plus the
    /// tokenizer's large ones from the shared fixtures (Qwen: vocab.json + merges.txt; Llama / Phi-3: tokenizer.model),
    /// exactly as tools/make_family_goldens.py wrote them for the reference run.
    /// </summary>
    public static string CompleteModelDir(string variant)
    {
        var dir = Directory.CreateTempSubdirectory($"vlmtune-{variant}-").FullName;
        foreach (var f in Directory.GetFiles(ModelDir(variant))) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        if (File.Exists(Path.Combine(dir, "vocab.json")) || variant.StartsWith("qwen", StringComparison.Ordinal))
            TokenizerFolders.WriteQwenVocabAndMerges(dir);
        else
            File.Copy(Path.Combine(TokenizerFolders.Llama2Dir, "tokenizer.model"), Path.Combine(dir, "tokenizer.model"));
        return dir;
    }

    private static readonly Dictionary<string, JsonDocument> Goldens = [];
    private static readonly Dictionary<string, SafetensorsFile> Tensors = [];

    public static JsonElement Golden(string variant)
    {
        lock (Goldens)
        {
            if (!Goldens.TryGetValue(variant, out var doc))
                Goldens[variant] = doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(Dir(variant), "golden.json")));
            return doc.RootElement;
        }
    }

    public static SafetensorsFile GoldenTensors(string variant)
    {
        lock (Tensors)
        {
            if (!Tensors.TryGetValue(variant, out var file))
                Tensors[variant] = file = SafetensorsFile.Open(Path.Combine(Dir(variant), "golden.safetensors"));
            return file;
        }
    }

    /// <summary>The shared fixture image a golden names (golden.json → images).</summary>
    public static string ImagePath(string variant, string name) =>
        Path.Combine(Fixtures.TinyDir, "images", Golden(variant).GetProperty("images").GetProperty(name).GetString()!);

    /// <summary>
    /// A case's official greedy ids and how many of them to hold an implementation to: up to and including the first
    /// step the reference decided by less than 1e-3 (a tie no implementation is held to).
    /// </summary>
    public static (int[] Ids, int Firm) GreedyIds(JsonElement goldenCase)
    {
        var ids = goldenCase.GetProperty("greedy_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        var margins = goldenCase.GetProperty("margins").EnumerateArray().Select(e => e.GetDouble()).ToArray();
        int firm = Array.FindIndex(margins, m => m < 1e-3) is var i and >= 0 ? i + 1 : ids.Length;
        return (ids, firm);
    }

    public static long[] Longs(JsonElement array) => array.EnumerateArray().Select(e => e.GetInt64()).ToArray();
}
