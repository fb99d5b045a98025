using System.Text.Json.Nodes;
using VlmTune.Checkpoints;
using VlmTune.Tests.Support;
using VlmTune.Training;
using static TorchSharp.torch;

namespace VlmTune.Tests.Training;

/// <summary>
/// Damaged checkpoints on resume, temporaries of killed runs, and a work dir that would write into the model: one clear
/// line each, never a .NET exception's own text or a stack trace.
/// </summary>
[Collection(GlobalTorchRng.Name)]
public sealed class CheckpointErrorTests
{
    private static readonly string[] Settings = ["max_steps=2", "batch_size=1", "save_steps=1", "save_total_limit=0", "dataloader_num_workers=0"];

    /// <summary>A finished two-step run; returns its iter_1 checkpoint.</summary>
    private static string TrainedCheckpoint(TrainTestData data)
    {
        using (var trainer = new Trainer(data.Config(Settings))) trainer.Train();
        return Path.Combine(data.WorkDir, "iter_1");
    }

    private static VlmTuneException ResumeFails(TrainTestData data, string checkpoint)
    {
        using var trainer = new Trainer(data.Config([.. Settings, $"work_dir={Path.Combine(data.Dir, "resumed")}"]), new TrainerOptions { Resume = checkpoint });
        var e = Assert.ThrowsAny<VlmTuneException>(() => trainer.Setup());
        Assert.DoesNotContain('\n', e.Message);
        return e;
    }

    private static void EditState(string checkpoint, Action<JsonObject> edit)
    {
        string path = Path.Combine(checkpoint, IterCheckpoint.StateFile);
        var state = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        edit(state);
        File.WriteAllText(path, state.ToJsonString());
    }

    [FixtureFact]
    public void DamagedCheckpointFilesAreOneLineNamingTheFileAndTheFix()
    {
        using var data = new TrainTestData(samples: 3);
        string checkpoint = TrainedCheckpoint(data);
        string optimizer = Path.Combine(checkpoint, IterCheckpoint.OptimizerFile), state = Path.Combine(checkpoint, IterCheckpoint.StateFile);
        byte[] optimizerBytes = File.ReadAllBytes(optimizer), stateText = File.ReadAllBytes(state);

        // A truncated optimizer.bin said only "Attempted to read past the end of the stream."
        File.WriteAllBytes(optimizer, optimizerBytes[..(optimizerBytes.Length * 2 / 3)]);
        var truncated = ResumeFails(data, checkpoint);
        Assert.Contains(optimizer, truncated.Message);
        Assert.Contains("truncated", truncated.Message);
        Assert.Contains($"takes {optimizerBytes.Length} bytes, the file has {optimizerBytes.Length * 2 / 3}", truncated.Message);
        Assert.Contains("resume from an earlier iter_<n>", truncated.Message);
        File.WriteAllBytes(optimizer, [.. optimizerBytes, 1, 2, 3]);
        Assert.Contains("3 bytes follow the optimizer state", ResumeFails(data, checkpoint).Message);
        File.WriteAllBytes(optimizer, optimizerBytes);

        // A string iteration gave a stack trace.
        EditState(checkpoint, s => s["iteration"] = "one");
        var iteration = ResumeFails(data, checkpoint);
        Assert.Contains($"{state}: 'iteration' must be an integer, not string \"one\"", iteration.Message);
        File.WriteAllBytes(state, stateText);
        EditState(checkpoint, s => s["trainable"] = new JsonArray(1, 2));
        Assert.Contains("'trainable' must be a list of strings", ResumeFails(data, checkpoint).Message);
        File.WriteAllBytes(state, stateText);
        EditState(checkpoint, s => s["counters"]!["too_long"] = 1.5);
        Assert.Contains("'too_long' must be an integer", ResumeFails(data, checkpoint).Message);
        File.WriteAllText(state, "[1, 2]");
        Assert.Contains("must hold a JSON object", ResumeFails(data, checkpoint).Message);
        File.WriteAllText(state, "{\"iteration\": ");
        Assert.Contains("is not valid JSON", ResumeFails(data, checkpoint).Message);
        File.WriteAllBytes(state, stateText);

        // Trained weights with NaN: refused before they reach the model.
        string adapter = Path.Combine(checkpoint, PeftAdapter.WeightsFile);
        using (var scope = NewDisposeScope())
        {
            using var file = SafetensorsFile.Open(adapter);
            var tensors = file.Entries.Keys.Order().Select(k => new KeyValuePair<string, Tensor>(k, file.Read(k))).ToList();
            tensors[0].Value.view(-1)[0] = float.NaN;
            file.Dispose();
            SafetensorsWriter.Write(adapter, tensors);
        }
        var nan = ResumeFails(data, checkpoint);
        Assert.Contains(adapter, nan.Message);
        Assert.Contains("NaN or infinite", nan.Message);
    }

    [FixtureFact]
    public void TemporariesOfKilledRunsAreRemovedAtStartAndThoseOfLiveOnesKept()
    {
        using var data = new TrainTestData(samples: 3);
        Directory.CreateDirectory(data.WorkDir);
        string dead = Temporaries.Folder(Path.Combine(data.WorkDir, Temporaries.OfDeadProcess(".iter_4.tmp-")));
        string live = Temporaries.Folder(Path.Combine(data.WorkDir, Temporaries.OfLiveProcess(".iter_4.tmp-")));
        string pointer = Path.Combine(data.WorkDir, Temporaries.OfDeadProcess(IterCheckpoint.LastCheckpointFile + ".tmp-"));
        File.WriteAllText(pointer, "iter_");
        // A checkpoint set aside for its replacement: removed only once the replacement exists.
        string replaced = Temporaries.Folder(Path.Combine(data.WorkDir, Temporaries.OfDeadProcess(".iter_2.old-")));
        string onlyCopy = Temporaries.Folder(Path.Combine(data.WorkDir, Temporaries.OfDeadProcess(".iter_9.old-")));
        Directory.CreateDirectory(Path.Combine(data.WorkDir, "iter_2"));

        using (var trainer = new Trainer(data.Config("max_steps=1", "save_steps=0"))) trainer.Setup();
        Assert.False(Directory.Exists(dead));
        Assert.False(File.Exists(pointer));
        Assert.False(Directory.Exists(replaced));
        Assert.True(Directory.Exists(live));
        Assert.True(Directory.Exists(onlyCopy));
    }

    [FixtureFact]
    public void AWorkDirInsideTheModelFolderIsRefused()
    {
        using var data = new TrainTestData(samples: 3);
        using var model = new ModelFolderBuilder();
        string modelDir = model.Build();
        string link = Path.Combine(data.Dir, "model-link");
        Directory.CreateSymbolicLink(link, modelDir);
        foreach (var workDir in new[] { modelDir, Path.Combine(link, "work") })
        {
            var e = Assert.Throws<ConfigException>(() => new Trainer(data.Config($"model={link}", $"work_dir={workDir}")).Setup());
            Assert.Contains("'work_dir'", e.Message);
            Assert.Contains("the model folder", e.Message);
        }
        Assert.False(Directory.Exists(Path.Combine(modelDir, "work")));
    }
}
