using System.Text.Json;
using System.Text.Json.Nodes;
using VlmTune.Checkpoints;
using VlmTune.Data;
using VlmTune.Distributed;
using VlmTune.IO;
using VlmTune.Models;
using static VlmTune.Checkpoints.IterCheckpoint;

namespace VlmTune.Training;

/// <summary>Where a run stands: what a checkpoint stores and a resume restores.</summary>
public sealed record TrainingPosition(long Iteration, long OptimizerSteps);

/// <summary>
/// A run's checkpoints in the <see cref="IterCheckpoint"/> layout: writing <c>iter_N/</c> (the LoRA adapters in PEFT
/// format, the other trained weights, the optimizer state, the trainer state) to a temporary sibling renamed last so
/// an interrupted write is never taken for a checkpoint, keeping save_total_limit of them, and resuming — after
/// checking that the checkpoint was trained the way this run trains.
/// </summary>
/// <param name="testPause">VLMTUNE_TEST_PAUSE: tests stop a save between its parts here.</param>
public sealed class TrainingCheckpointer(TrainConfig config, string workDir, InternVLChatModel model, PreparedModel prepared,
    TrainingOptimizer optimizer, DataParallel? dp, TrainLog log, string? testPause = null)
{
    private int Rank => dp?.Rank ?? 0;
    private int WorldSize => dp?.WorldSize ?? 1;
    private bool IsMaster => Rank == 0;

    /// <summary>The newest checkpoint this run wrote or resumed from.</summary>
    public string? Last { get; private set; }

    /// <summary>
    /// The checkpoint <c>--resume</c> names: null (start fresh), "auto" (the latest complete one of the work dir, fresh
    /// if none) or a checkpoint folder, checked to be complete.
    /// </summary>
    public static string? FindResume(string? resume, string workDir)
    {
        switch (resume)
        {
            case null: return null;
            case "auto": return Latest(workDir);
            default:
                string dir = Path.GetFullPath(resume);
                if (!Directory.Exists(dir)) throw new VlmTuneException($"--resume: checkpoint folder not found: {dir}");
                if (!File.Exists(Path.Combine(dir, StateFile)))
                    throw new VlmTuneException($"--resume: {dir} is not a complete VlmTune checkpoint (no {StateFile}); pass an iter_<n> folder of a work dir, or --resume auto");
                return dir;
        }
    }

    /// <summary>
    /// Writes <c>iter_&lt;n&gt;/</c> for <paramref name="at"/>. Data-parallel: every rank calls this at the same
    /// iteration. Rank 0 writes the folder; under ZeRO-1 each rank adds its optimizer shard (a shared filesystem across
    /// nodes, as DeepSpeed needs); the rename happens only once every part is in.
    /// </summary>
    /// <param name="eval">The evaluation at this iteration, if any: stored as <c>eval.json</c> and its loss in the state.</param>
    /// <param name="asBest">Write <c>best/</c> (the lowest eval loss so far) instead of <c>iter_N/</c>: not pruned, not the latest.</param>
    public string Save(TrainingPosition at, long totalIterations, int samples, DataCounters counters, EvalResult? eval = null, bool asBest = false)
    {
        dp?.Heartbeat();
        string name = asBest ? BestFolder : FolderName(at.Iteration);
        string final = Path.Combine(workDir, name);
        string temp = IO.OwnedTemporary.Name(Path.Combine(workDir, $".{name}{TempMarker}"));
        if (dp is not null) temp = dp.Broadcast(temp);
        if (IsMaster) Directory.CreateDirectory(temp);
        dp?.Barrier();
        var gathered = new List<TorchSharp.torch.Tensor>();
        try
        {
            // Everything from the fp32 masters, so the adapters of an offloaded optimizer and the trained non-LoRA
            // weights resume exactly.
            var masters = optimizer.Masters();
            if (IsMaster && prepared.LlmLora is { } llmLora) PeftAdapter.Save(model.language_model, temp, llmLora, n => masters.GetValueOrDefault("language_model." + n));
            if (IsMaster && prepared.VisionLora is { } visionLora) PeftAdapter.Save(model.vision_model, Path.Combine(temp, VisionAdapterDir), visionLora, n => masters.GetValueOrDefault("vision_model." + n));
            var full = optimizer.TrainedNonLoraMasters(gathered);
            if (IsMaster && full.Count > 0) TrainedWeights.Save(temp, full);
            optimizer.SaveState(temp);
            dp?.Barrier();
            VlmTune.Diagnostics.TestPause.At(testPause, "checkpoint", CancellationToken.None);
            if (IsMaster && eval is not null) AtomicFile.WriteAllText(Path.Combine(temp, EvalFile), eval.ToJson());
            if (IsMaster) Commit(temp, final, State(at, totalIterations, samples, counters, eval));
        }
        catch (Exception e)
        {
            if (IsMaster) try { Directory.Delete(temp, recursive: true); } catch (IOException) { }
            if (IO.DiskFull.Is(e)) throw IO.DiskFull.Error($"checkpoint {name}", workDir, "no checkpoint was saved (the earlier ones are intact)", e);
            throw;
        }
        finally { foreach (var t in gathered) t.Dispose(); }
        dp?.Barrier();
        dp?.Heartbeat();
        if (asBest)
        {
            if (IsMaster) log.Info($"new best eval loss {eval?.Loss:F4} at iteration {at.Iteration}: saved {final}");
            return final;
        }
        Last = final;
        if (IsMaster)
        {
            AtomicFile.WriteAllText(Path.Combine(workDir, LastCheckpointFile), final);
            log.Info($"saved checkpoint {final}");
            Prune();
        }
        return final;
    }

    /// <summary>The eval loss stored with <c>best/</c> of a work dir, or null (none yet, or an older checkpoint).</summary>
    public static double? BestEvalLoss(string workDir)
    {
        string path = Path.Combine(workDir, BestFolder, StateFile);
        if (!File.Exists(path)) return null;
        var state = CheckpointFiles.ReadState(path);
        return state["eval_loss"] is JsonValue v && v.TryGetValue<double>(out var loss) ? loss : null;
    }

    private JsonObject State(TrainingPosition at, long totalIterations, int samples, DataCounters counters, EvalResult? eval) => new()
    {
        ["iteration"] = at.Iteration,
        ["optimizer_steps"] = at.OptimizerSteps,
        ["total_iterations"] = totalIterations,
        ["samples"] = samples,
        ["mode"] = config.Mode.ToString().ToLowerInvariant(),
        ["lora_r"] = config.LoraR,
        ["batch_size"] = config.BatchSize,
        ["accumulative_counts"] = config.AccumulativeCounts,
        ["seed"] = config.Seed,
        ["world_size"] = WorldSize,
        ["zero_stage"] = optimizer.ZeroStage,
        ["optim"] = config.OptimizerName,
        ["trainable"] = new JsonArray(prepared.Trainable.Select(t => (JsonNode?)JsonValue.Create(t.Name)).ToArray()),
        ["counters"] = new JsonObject
        {
            ["bad_records"] = counters.BadRecords, ["broken_images"] = counters.BrokenImages, ["too_long"] = counters.TooLong,
            ["label_mismatch"] = counters.LabelMismatch, ["nan_skipped"] = counters.NanSkipped,
        },
        ["eval_loss"] = eval is { Loss: var loss } && double.IsFinite(loss) ? loss : null,
        ["config"] = config.Resolved().ToYaml(),
    };

    private void Commit(string temp, string final, JsonObject state)
    {
        // The state file is written last: its presence marks the folder complete.
        AtomicFile.WriteAllText(Path.Combine(temp, StateFile), state.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        // Replacing a checkpoint of the same iteration (a rerun in the same work dir): move the old one aside first,
        // so one complete copy exists at every moment.
        string? old = null;
        if (Directory.Exists(final))
        {
            old = IO.OwnedTemporary.Name(Path.Combine(workDir, $".{Path.GetFileName(final)}{OldMarker}"));
            Directory.Move(final, old);
        }
        Directory.Move(temp, final);
        if (old is not null) Directory.Delete(old, recursive: true);
    }

    private void Prune()
    {
        if (config.SaveTotalLimit <= 0) return;
        var all = All(workDir);
        foreach (var (_, dir) in all.Take(Math.Max(0, all.Count - config.SaveTotalLimit)))
        {
            Directory.Delete(dir, recursive: true);
            log.Info($"removed old checkpoint {dir} (save_total_limit {config.SaveTotalLimit})");
        }
    }

    /// <summary>
    /// Loads the checkpoint in <paramref name="dir"/> into the model and optimizer and the counters; every difference
    /// from how this run trains is reported at once (the run's config source names the file).
    /// </summary>
    public TrainingPosition Resume(string dir, int samples, DataCounters counters)
    {
        string statePath = Path.Combine(dir, StateFile);
        var state = CheckpointFiles.ReadState(statePath);
        var problems = new List<string>();
        void Same<T>(string key, T expected) where T : notnull
        {
            var stored = state[key] is JsonValue v && v.TryGetValue<T>(out var x) ? x : default;
            if (stored is null || !stored.Equals(expected)) problems.Add($"'{key}' is {expected} but the checkpoint was trained with {state[key]?.ToJsonString() ?? "nothing"}");
        }
        Same("mode", config.Mode.ToString().ToLowerInvariant());
        Same("lora_r", config.LoraR);
        Same("batch_size", config.BatchSize);
        Same("accumulative_counts", config.AccumulativeCounts);
        Same("seed", config.Seed);
        Same("samples", samples);
        // Older checkpoints predate data parallelism: one process, no ZeRO.
        long storedWorld = CheckpointFiles.Integer(state, "world_size", statePath, fallback: 1), storedZero = CheckpointFiles.Integer(state, "zero_stage", statePath, fallback: 0);
        if (storedWorld != WorldSize)
            problems.Add($"it was trained by {storedWorld} process(es) and this run has {WorldSize}: the global batch (batch_size × processes) would change; resume with --nproc-per-node {storedWorld}");
        if (storedZero != optimizer.ZeroStage) problems.Add($"'zero_stage' is {optimizer.ZeroStage} but the checkpoint was written with zero_stage {storedZero}");
        // Older checkpoints predate optim: TorchSharp's AdamW. The states do not convert (TrainingOptimizer.LoadState).
        string storedOptim = state["optim"] is JsonValue o && o.TryGetValue<string>(out var name) ? name : "adamw";
        if (storedOptim != config.OptimizerName)
            problems.Add($"'optim' is {config.Optim} but {Path.Combine(dir, optimizer.StateFileName)} holds {storedOptim} states, which do not convert; resume with optim: {storedOptim}, or start a new run");
        var names = CheckpointFiles.Strings(state, "trainable", statePath);
        if (!names.SequenceEqual(prepared.Trainable.Select(t => t.Name)))
            problems.Add("the trained parameters differ from the checkpoint's (freeze_* or lora_targets changed)");
        if (problems.Count > 0)
            throw new ConfigException(config.Source, problems.Select(p => $"--resume {dir}: {p}").ToList());

        static Func<string, string?> InAdapter(string part) => n => n.StartsWith(part, StringComparison.Ordinal) ? PeftAdapter.TensorName(n[part.Length..]) : null;
        if (prepared.LlmLora is not null)
            using (var file = SafetensorsFile.Open(Path.Combine(dir, PeftAdapter.WeightsFile)))
            {
                AdapterCheckpoint.RequireFinite(file);
                PeftAdapter.LoadWeights(model.language_model, file);
                optimizer.LoadMasters(file, InAdapter("language_model."));   // exact fp32 masters where the model rounds
            }
        if (prepared.VisionLora is not null)
            using (var file = SafetensorsFile.Open(Path.Combine(dir, VisionAdapterDir, PeftAdapter.WeightsFile)))
            {
                AdapterCheckpoint.RequireFinite(file);
                PeftAdapter.LoadWeights(model.vision_model, file);
                optimizer.LoadMasters(file, InAdapter("vision_model."));
            }
        if (prepared.Trainable.Any(t => !t.Name.Contains(".lora_")))
        {
            if (File.Exists(Path.Combine(dir, TrainableFile)))
                using (var trained = SafetensorsFile.Open(Path.Combine(dir, TrainableFile))) AdapterCheckpoint.RequireFinite(trained);
            if (TrainedWeights.LoadIfPresent(model, dir) == 0)
                throw new VlmTuneException($"--resume: {dir} has no {TrainableFile} but this run trains non-LoRA weights.");
            using var file = SafetensorsFile.Open(Path.Combine(dir, TrainableFile));
            optimizer.LoadMasters(file);
        }
        string optimizerFile = Path.Combine(dir, optimizer.StateFileName);
        if (!File.Exists(optimizerFile)) throw new VlmTuneException($"--resume: {dir} has no {Path.GetFileName(optimizerFile)} (an incomplete checkpoint?)");
        var c = CheckpointFiles.Object(state, "counters", statePath);
        long Counter(string key) => CheckpointFiles.Integer(c, key, $"{statePath} (counters)");
        var restored = (Counter("bad_records"), Counter("broken_images"), Counter("too_long"), Counter("label_mismatch"), Counter("nan_skipped"));
        long iteration = CheckpointFiles.Integer(state, "iteration", statePath), steps = CheckpointFiles.Integer(state, "optimizer_steps", statePath);
        if (iteration < 0 || steps < 0 || steps > iteration)
            throw new VlmTuneException($"--resume: {statePath}: iteration {iteration} with optimizer_steps {steps} is impossible; the checkpoint is damaged.");
        optimizer.LoadState(optimizerFile, steps);
        counters.Restore(restored.Item1, restored.Item2, restored.Item3, restored.Item4, restored.Item5);
        Last = dir;
        log.Info($"resumed from {dir} at iteration {iteration} (optimizer step {steps})");
        return new TrainingPosition(iteration, steps);
    }
}
