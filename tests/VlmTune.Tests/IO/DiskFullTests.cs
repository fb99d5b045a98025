using VlmTune.Checkpoints;
using VlmTune.Tests.Data;
using VlmTune.Tests.Support;
using VlmTune.Tests.Training;
using VlmTune.Training;

namespace VlmTune.Tests.IO;

/// <summary>Out of disk space for real (a small tmpfs): one "disk full" line, and no partial output anywhere.</summary>
[Collection(GlobalTorchRng.Name)]
public sealed class DiskFullTests
{
    private static void AssertDiskFull(Exception e, string folder)
    {
        Assert.StartsWith("disk full: writing ", e.Message);
        Assert.Contains(folder, e.Message);
        Assert.Contains(" left)", e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [TmpfsFact]
    public void MergeIntoAFullDiskLeavesNoOutputAndNoTemporary()
    {
        using var disk = Tmpfs.Mount(4 << 20);   // the tiny model's weights take 24 MB
        string outDir = Path.Combine(disk.Dir, "merged");
        var e = Assert.Throws<VlmTuneException>(() => ModelMerger.Merge(new MergeOptions
        {
            BaseDir = Fixtures.TinyModel, AdapterDir = Fixtures.Adapter, OutDir = outDir, Verify = null,
        }));
        AssertDiskFull(e, disk.Dir);
        Assert.Contains($"nothing was written to {outDir}", e.Message);
        Assert.Empty(Directory.EnumerateFileSystemEntries(disk.Dir));
    }

    [TmpfsFact]
    public async Task ConvertOntoAFullDiskIsOneErrorLineAndNoOutput()
    {
        using var data = new TempDir();
        data.Jpeg("images/a.jpg", 8, 8);
        data.Write("cn.jsonl", string.Concat(Enumerable.Repeat("""{"type": "I2T", "question": null, "image": "a", "text": "一个很长的梗,一个很长的梗,一个很长的梗"}""" + "\n", 2000)));
        using var disk = Tmpfs.Mount(64 << 10);
        string output = Path.Combine(disk.Dir, "ex.json");
        var (code, _, stderr) = await CliProcess.RunAsync(["data", "convert-oogiri", "--input", data["cn.jsonl"], "--output", output]);
        Assert.Equal(1, code);
        var line = Assert.Single(stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries));
        Assert.StartsWith("error: disk full: writing ex.json in ", line);
        Assert.Contains($"{output} was not written", line);
        Assert.Empty(Directory.EnumerateFileSystemEntries(disk.Dir));
    }

    [TmpfsFact]
    public void ACheckpointThatDoesNotFitIsNotSavedAndLeavesNoTemporary()
    {
        using var data = new TrainTestData(samples: 3);
        using var disk = Tmpfs.Mount(1 << 20);   // room for the logs, not for a checkpoint (about 9 MB)
        using var trainer = new Trainer(data.Config("max_steps=1", "save_steps=0", "dataloader_num_workers=0", $"work_dir={disk.Dir}"));
        var e = Assert.ThrowsAny<VlmTuneException>(() => trainer.Train());
        AssertDiskFull(e, disk.Dir);
        Assert.Contains("checkpoint iter_1", e.Message);
        Assert.Contains("no checkpoint was saved", e.Message);
        Assert.Empty(Directory.GetDirectories(disk.Dir, "iter_*"));
        Assert.Empty(Directory.GetDirectories(disk.Dir, ".iter_*"));
        Assert.Empty(Directory.GetFiles(disk.Dir, "*.tmp-*", SearchOption.AllDirectories));
    }
}
