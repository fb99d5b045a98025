using VlmTune.Checkpoints;
using VlmTune.Inference;
using VlmTune.Tests.Support;
using static TorchSharp.torch;

namespace VlmTune.Tests.Checkpoints;

/// <summary>What merge must never do: delete or write into its inputs, keep temporaries forever, publish NaN weights.</summary>
public sealed class MergeSafetyTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vlmtune-merge-safety-").FullName;

    public void Dispose()
    {
        try { Directory.Delete(_dir, true); } catch (IOException) { }
    }

    private static MergeResult Merge(string outDir, string baseDir, string? adapter = null, bool force = true) =>
        ModelMerger.Merge(new MergeOptions { BaseDir = baseDir, AdapterDir = adapter ?? Fixtures.Adapter, OutDir = outDir, Force = force, Verify = null });

    private static string CopyFolder(string from, string to)
    {
        Directory.CreateDirectory(to);
        foreach (var f in Directory.GetFiles(from)) File.Copy(f, Path.Combine(to, Path.GetFileName(f)));
        return to;
    }

    private static Dictionary<string, byte[]> Snapshot(string dir) => Directory.GetFiles(dir).ToDictionary(f => f, File.ReadAllBytes);

    private static void AssertUnchanged(Dictionary<string, byte[]> before, string dir)
    {
        Assert.Equal(before.Keys.Order(), Directory.GetFiles(dir).Order());
        foreach (var (f, bytes) in before) Assert.Equal(bytes, File.ReadAllBytes(f));
    }

    [FixtureFact]
    public void OutputsThatWouldReplaceOrEnterTheBaseOrAdapterThroughSymlinksAreRefused()
    {
        string baseDir = CopyFolder(Fixtures.TinyModel, Path.Combine(_dir, "disk", "models", "base"));
        string adapter = CopyFolder(Fixtures.Adapter, Path.Combine(_dir, "disk", "adapters", "run1"));
        string baseLink = Path.Combine(_dir, "base-link"), adapterLink = Path.Combine(_dir, "adapter-link"), outLink = Path.Combine(_dir, "out-link");
        Directory.CreateSymbolicLink(baseLink, baseDir);
        Directory.CreateSymbolicLink(adapterLink, adapter);
        Directory.CreateSymbolicLink(outLink, baseDir);
        var baseBefore = Snapshot(baseDir);
        var adapterBefore = Snapshot(adapter);

        // --base through a symlink, --out its real parent with --force: this deleted the base model.
        var parent = Assert.Throws<VlmTuneException>(() => Merge(Path.Combine(_dir, "disk", "models"), baseLink, adapterLink));
        Assert.Contains("contains the base model folder", parent.Message);
        Assert.Contains(baseDir, parent.Message);   // the real folder is named
        // "link/.." is the target's parent, as the kernel resolves it.
        Assert.Contains("contains the base model folder", Assert.Throws<VlmTuneException>(() => Merge(baseLink + "/..", baseLink)).Message);
        Assert.Contains("is the base model folder", Assert.Throws<VlmTuneException>(() => Merge(outLink, baseDir)).Message);
        Assert.Contains("is inside the base model folder", Assert.Throws<VlmTuneException>(() => Merge(Path.Combine(baseLink, "merged"), baseDir)).Message);
        Assert.Contains("contains the adapter folder", Assert.Throws<VlmTuneException>(() => Merge(Path.Combine(_dir, "disk", "adapters"), baseDir, adapterLink)).Message);
        Assert.Contains("is inside the adapter folder", Assert.Throws<VlmTuneException>(() => Merge(Path.Combine(adapter, "merged"), baseDir, adapterLink)).Message);
        Assert.Contains("is the adapter folder", Assert.Throws<VlmTuneException>(() => Merge(adapterLink, baseDir, adapter)).Message);

        AssertUnchanged(baseBefore, baseDir);
        AssertUnchanged(adapterBefore, adapter);
        Assert.False(Directory.Exists(Path.Combine(baseDir, "merged")));
    }

    [FixtureFact]
    public void TemporariesOfKilledMergesAreRemovedAndThoseOfLiveOnesKept()
    {
        string outDir = Path.Combine(_dir, "merged");
        string dead = Temporaries.Folder(Path.Combine(_dir, Temporaries.OfDeadProcess(".merged.merge-tmp-")));
        string live = Temporaries.Folder(Path.Combine(_dir, Temporaries.OfLiveProcess(".merged.merge-tmp-")));
        // A previous output set aside by a merge killed before deleting it; the new output is in place.
        Directory.CreateDirectory(outDir);
        string oldOut = Temporaries.Folder(Path.Combine(_dir, Temporaries.OfDeadProcess(".merged.merge-old-")));
        string otherOut = Temporaries.Folder(Path.Combine(_dir, Temporaries.OfDeadProcess(".other.merge-tmp-")));

        var log = new List<string>();
        ModelMerger.Merge(new MergeOptions { BaseDir = Fixtures.TinyModel, AdapterDir = Fixtures.Adapter, OutDir = outDir, Verify = null, Log = log.Add });

        Assert.False(Directory.Exists(dead));
        Assert.False(Directory.Exists(oldOut));
        Assert.True(Directory.Exists(live));
        Assert.True(Directory.Exists(otherOut));   // another output's: not this merge's to judge
        Assert.Contains(log, l => l.Contains(dead) && l.Contains("interrupted merge"));
        Assert.True(File.Exists(Path.Combine(outDir, "model.safetensors")));
    }

    /// <summary>The fixture adapter with one value of one LoRA B replaced.</summary>
    private string AdapterWith(float value, string tensor = "base_model.model.model.layers.0.attention.wqkv.lora_B.weight")
    {
        string adapter = Path.Combine(_dir, "adapter-" + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(adapter);
        File.Copy(Path.Combine(Fixtures.Adapter, PeftAdapter.ConfigFile), Path.Combine(adapter, PeftAdapter.ConfigFile));
        using var scope = NewDisposeScope();
        using var good = SafetensorsFile.Open(Path.Combine(Fixtures.Adapter, PeftAdapter.WeightsFile));
        var tensors = good.Entries.Keys.Order().Select(k => new KeyValuePair<string, Tensor>(k, good.Read(k))).ToList();
        tensors.Single(t => t.Key == tensor).Value[0, 0] = value;
        SafetensorsWriter.Write(Path.Combine(adapter, PeftAdapter.WeightsFile), tensors);
        return adapter;
    }

    [FixtureTheory]
    [InlineData(float.NaN)]
    [InlineData(float.PositiveInfinity)]
    public void NonFiniteAdaptersAreRefusedOnEveryLoadPathNamingFileAndTensor(float value)
    {
        string adapter = AdapterWith(value);
        string file = Path.Combine(adapter, PeftAdapter.WeightsFile);
        void AssertNamed(Exception e)
        {
            Assert.Contains(file, e.Message);
            Assert.Contains("'base_model.model.model.layers.0.attention.wqkv.lora_B.weight'", e.Message);
            Assert.Contains("NaN or infinite", e.Message);
            Assert.DoesNotContain('\n', e.Message);
        }

        // chat --adapter (unmerged), serve (merged into the loaded weights), merge: one check where adapters are opened.
        AssertNamed(Assert.Throws<CheckpointException>(() => InternVLChat.Load(Fixtures.TinyModel, new ChatLoadOptions { AdapterDir = adapter, MergeAdapter = false })));
        AssertNamed(Assert.Throws<CheckpointException>(() => InternVLChat.Load(Fixtures.TinyModel, new ChatLoadOptions { AdapterDir = adapter, MergeAdapter = true })));
        AssertNamed(Assert.Throws<CheckpointException>(() => Merge(Path.Combine(_dir, "merged"), Fixtures.TinyModel, adapter, force: false)));
        Assert.False(Directory.Exists(Path.Combine(_dir, "merged")));
    }
}
