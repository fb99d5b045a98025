namespace VlmTune.Checkpoints;

/// <summary>
/// The layout of a training run's checkpoints in its work dir, owned here so that the trainer that writes them and the
/// merge / chat / serve code that reads them (<see cref="AdapterCheckpoint"/>) name the same files:
/// <code>
/// work_dir/
///   last_checkpoint            path of the newest complete checkpoint
///   iter_N/                    one checkpoint; complete once trainer_state.json is in it
///     adapter_config.json, adapter_model.safetensors    the LLM's LoRA (PEFT)
///     vision_lora/             the ViT's LoRA (PEFT), when trained
///     trainable.safetensors    trained non-LoRA weights (projector, full fine-tuning)
///     optimizer.bin | optimizer.rankR.bin               AdamW state (ZeRO-1: one shard per rank)
///     trainer_state.json       iteration, counters, the resolved config
///     eval.json                the evaluation at that iteration (eval_data), when there was one
///   best/                      the checkpoint of the lowest eval loss (save_best), laid out as iter_N/
///   .iter_N.tmp-OWNER/         a checkpoint being written; .iter_N.old-OWNER/ one being replaced (.best.* alike)
/// </code>
/// </summary>
public static class IterCheckpoint
{
    public const string StateFile = "trainer_state.json";
    public const string TrainableFile = TrainedWeights.FileName;
    public const string OptimizerFile = "optimizer.bin";
    public const string VisionAdapterDir = "vision_lora";
    public const string LastCheckpointFile = "last_checkpoint";
    public const string BestFolder = "best";
    public const string EvalFile = "eval.json";
    /// <summary>Checkpoint folders are written as <c>.iter_N.tmp-OWNER</c>; one being replaced is set aside as <c>.iter_N.old-OWNER</c>.</summary>
    public const string TempMarker = ".tmp-", OldMarker = ".old-";

    /// <summary>A ZeRO-1 rank's share of the optimizer state.</summary>
    public static string OptimizerShardFile(int rank) => $"optimizer.rank{rank}.bin";

    public static string FolderName(long iteration) => $"iter_{iteration}";

    /// <summary>The newest complete checkpoint under <paramref name="workDir"/> (temporary folders of interrupted writes are ignored), or null.</summary>
    public static string? Latest(string workDir)
    {
        if (!Directory.Exists(workDir)) return null;
        string pointer = Path.Combine(workDir, LastCheckpointFile);
        if (File.Exists(pointer))
        {
            string dir = File.ReadAllText(pointer).Trim();
            if (!Path.IsPathRooted(dir)) dir = Path.Combine(workDir, dir);
            if (File.Exists(Path.Combine(dir, StateFile))) return Path.GetFullPath(dir);
        }
        return All(workDir).LastOrDefault().Dir;
    }

    /// <summary>The complete checkpoints of a work dir, oldest first.</summary>
    public static IReadOnlyList<(long Iteration, string Dir)> All(string workDir) =>
        Directory.EnumerateDirectories(workDir, "iter_*")
            .Select(d => (Dir: d, Name: Path.GetFileName(d)))
            .Where(d => long.TryParse(d.Name["iter_".Length..], out _) && File.Exists(Path.Combine(d.Dir, StateFile)))
            .Select(d => (long.Parse(d.Name["iter_".Length..]), Path.GetFullPath(d.Dir)))
            .OrderBy(d => d.Item1).ToList();
}
