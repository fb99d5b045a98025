using System.Globalization;
using System.Text;
using YamlDotNet.Core;
using YamlDotNet.RepresentationModel;
using VlmTune.Models;
using ScalarType = TorchSharp.torch.ScalarType;

namespace VlmTune.Training;

public enum TrainMode { Full, Lora, Qlora }

public enum NanPolicy { Stop, Skip }

/// <summary>
/// Everything <c>vlmtune train</c> reads from its YAML config, one flat set of keys (see docs/training.md and
/// configs/). Any key can be overridden with <c>--set key=value</c> (the value is read as YAML: <c>--set lr=1e-5</c>,
/// <c>--set data=[a.jsonl,b.jsonl]</c>). Unknown keys, wrong types and impossible combinations are all reported at once.
/// </summary>
public sealed class TrainConfig
{
    // What to train on.
    public string Model { get; set; } = "";
    public List<string> Data { get; set; } = [];
    public string? ImageRoot { get; set; }
    /// <summary>Null: the model's config.json <c>template</c> (chat, serving and training share one template).</summary>
    public string? Template { get; set; }
    public string? SystemMessage { get; set; }
    public int MaxLength { get; set; } = 8192;
    // Tiling; null: the model's config.json (min/max_dynamic_patch, use_thumbnail; dynamic_image_size false = one tile).
    public int? MinDynamicPatch { get; set; }
    public int? MaxDynamicPatch { get; set; }
    public bool? UseThumbnail { get; set; }

    // What to train.
    public TrainMode Mode { get; set; } = TrainMode.Qlora;
    public bool FreezeVision { get; set; } = true;
    public bool FreezeProjector { get; set; }
    /// <summary>Null: frozen for lora/qlora, trained for full.</summary>
    public bool? FreezeLlm { get; set; }
    public int LoraR { get; set; } = 128;
    public double LoraAlpha { get; set; } = 256;
    public double LoraDropout { get; set; } = 0.05;
    /// <summary>
    /// Null: every decoder linear of the model's family under the official wrap_llm_lora names, and the output head
    /// unless it is tied (InternLM2: wqkv, wo, w1, w2, w3, output; Qwen/Llama: q/k/v/o_proj, gate/up/down_proj, lm_head).
    /// </summary>
    public List<string>? LoraTargets { get; set; }
    /// <summary>0: no vision LoRA. Otherwise LoRA of this rank on the ViT's attention and MLP linears.</summary>
    public int VisionLoraR { get; set; }
    public double VisionLoraAlpha { get; set; } = 16;
    public List<string> VisionLoraTargets { get; set; } = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"];

    // How to train.
    public double Lr { get; set; } = 2e-4;
    public List<double> Betas { get; set; } = [0.9, 0.999];
    public double WeightDecay { get; set; } = 0.05;
    public double MaxNorm { get; set; } = 1.0;
    public double WarmupRatio { get; set; } = 0.03;
    public int BatchSize { get; set; } = 4;
    public int AccumulativeCounts { get; set; } = 4;
    public int? MaxEpochs { get; set; } = 1;
    /// <summary>Iterations (micro-batches) to run; when set, it wins over max_epochs.</summary>
    public long? MaxSteps { get; set; }
    public bool GradientCheckpointing { get; set; } = true;
    public bool GroupByLength { get; set; } = true;
    /// <summary>
    /// Sequence packing (XTuner's key): each micro-batch's batch_size samples share rows of at most max_length tokens,
    /// whole samples only, attention never crossing samples, instead of each sample padded to the longest.
    /// </summary>
    public bool PackToMaxLength { get; set; }
    /// <summary>
    /// Rounds each micro-batch's row length up to a multiple of this many tokens (the padding goes after the samples,
    /// with ignored labels, so no real token sees it under causal attention and the loss is unchanged). The GPU then
    /// meets a handful of sequence lengths instead of a new one almost every step, and a new length is costly: on an
    /// H200, short CLoT samples of varying length took 0.29 s a step against 0.20 s at a fixed length
    /// (docs/performance.md). Null: <see cref="DefaultPadMultipleOnCuda"/> on CUDA, 1 (no rounding) on the CPU.
    /// </summary>
    public int? PadToMultipleOf { get; set; }
    public const int DefaultPadMultipleOnCuda = 64;

    /// <summary>The row-length multiple in effect on the run's device.</summary>
    public int PadMultiple(bool cuda) => PadToMultipleOf ?? (cuda ? DefaultPadMultipleOnCuda : 1);
    public int DataloaderNumWorkers { get; set; } = 4;
    /// <summary>
    /// Store the frozen ViT's output per sample on disk on first use and reuse it in later epochs and resumed runs
    /// (no image decoding, tiling or ViT for those samples). Needs a frozen vision tower without vision LoRA.
    /// </summary>
    public bool CacheVisionFeatures { get; set; }
    /// <summary>Where the vision feature cache lives (null: &lt;work_dir&gt;/vision_cache). Several runs may share one.</summary>
    public string? VisionCacheDir { get; set; }
    public int LossChunkSize { get; set; } = 1024;
    public int Seed { get; set; } = 42;
    public string Device { get; set; } = "cuda";
    /// <summary>auto: bf16 on CUDA, fp32 on CPU. bfloat16 and float32 mean bf16 and fp32.</summary>
    public string Dtype
    {
        get;
        // Every spelling TensorPlacement knows for a training dtype, kept in the short form the trainer and the run log use.
        set => field = TensorPlacement.TryParseDType(value, out var d) && d is ScalarType.BFloat16 or ScalarType.Float32 ? TensorPlacement.ShortName(d) : value;
    } = "auto";
    public NanPolicy NanPolicy { get; set; } = NanPolicy.Stop;
    /// <summary>
    /// The optimizer, by Hugging Face TrainingArguments' <c>optim</c> names: <c>adamw</c> (= <c>adamw_torch</c>; torch's
    /// AdamW, fp32 moments) or <c>adamw_8bit</c> (= <c>adamw_bnb_8bit</c>; bitsandbytes' AdamW8bit, 8-bit block-wise
    /// moments, <see cref="AdamW8bit"/>). <c>paged_adamw_8bit</c> (the QLoRA paper's) takes the same 8-bit states, not paged.
    /// </summary>
    public string Optim { get; set; } = "adamw";

    /// <summary>Every <c>optim</c> value accepted, TorchSharp's AdamW first.</summary>
    public static IReadOnlyList<string> OptimNames { get; } = ["adamw", "adamw_torch", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"];

    /// <summary>8-bit block-wise AdamW states (any of its names).</summary>
    public bool Adam8bit => Optim is "adamw_8bit" or "adamw_bnb_8bit" or "paged_adamw_8bit";

    /// <summary>The optimizer's canonical name (what checkpoints record): adamw or adamw_8bit.</summary>
    public string OptimizerName => Adam8bit ? "adamw_8bit" : "adamw";

    /// <summary>What is wrong with an <c>optim</c> value, or null.</summary>
    public static string? OptimProblem(string value) => OptimNames.Contains(value) ? null
        : $"'optim': '{value}' is not an optimizer vlmtune has (accepted: adamw or adamw_torch, fp32 AdamW states; adamw_8bit, adamw_bnb_8bit or paged_adamw_8bit, bitsandbytes' 8-bit block-wise states)";

    // Data parallelism (several processes; see docs/distributed.md). batch_size stays per process.
    /// <summary>0: every rank keeps the whole optimizer state; 1: ZeRO-1, each rank keeps (and updates) its share.</summary>
    public int ZeroStage { get; set; }
    /// <summary>Seconds a rank waits for the others (rendezvous, collectives, a step without progress) before the job ends.</summary>
    public int DistTimeoutS { get; set; } = 900;
    /// <summary>
    /// fp32 master weights and AdamW state in host memory, AdamW on the CPU (ZeRO-Offload; QLoRA's paged optimizer):
    /// the GPU keeps only bf16 weights and gradients of what is trained.
    /// </summary>
    public bool OptimizerOffload { get; set; }
    /// <summary>The frozen ViT's linear weights in NF4 (XTuner's quantization_vit): ~0.4 GB less for InternViT-300M.</summary>
    public bool QuantizeVision { get; set; }
    /// <summary>Checkpointed layer inputs wait in pinned host memory between the forward and backward pass.</summary>
    public bool ActivationOffload { get; set; }

    // Evaluation during training (see docs/training.md).
    /// <summary>Held-out data files (any training data format); empty: no evaluation.</summary>
    public List<string> EvalData { get; set; } = [];
    /// <summary>Iterations between evaluations, after an optimizer step (null: save_steps; 0: only at the end). The run's end always evaluates.</summary>
    public long? EvalSteps { get; set; }
    /// <summary>The first this many eval samples are evaluated (null: all).</summary>
    public int? EvalMaxSamples { get; set; }
    /// <summary>Eval samples whose first question is answered greedily at each evaluation (written to the run folder and the checkpoint).</summary>
    public int EvalGenerate { get; set; } = 4;
    public int EvalMaxNewTokens { get; set; } = 64;
    /// <summary>Keep the checkpoint of the lowest eval loss as &lt;work_dir&gt;/best (never pruned).</summary>
    public bool SaveBest { get; set; }

    // Outputs.
    public string? Name { get; set; }
    public string? WorkDir { get; set; }
    public int LogInterval { get; set; } = 10;
    /// <summary>Iterations between checkpoints (0: only at the end).</summary>
    public long SaveSteps { get; set; } = 500;
    /// <summary>Checkpoints kept (≤ 0: all).</summary>
    public int SaveTotalLimit { get; set; } = 2;
    /// <summary>Peak dense TFLOPS of the device for the MFU column (default: 989, an H100 SXM in bf16; none on CPU).</summary>
    public double? PeakTflops { get; set; }
    /// <summary>
    /// Where the scalars go besides the log and vis_data/scalars.json, as Hugging Face's <c>report_to</c> (one name or a
    /// list): <c>tensorboard</c> writes TensorBoard event files into vis_data/; <c>all</c> means every integration vlmtune
    /// has (TensorBoard); <c>none</c> (or an empty list, the default) nothing more.
    /// </summary>
    public List<string> ReportTo { get; set; } = [];

    public bool ReportsToTensorBoard => ReportTo.Contains("tensorboard") || ReportTo.Contains("all");

    private static readonly string[] Integrations = ["tensorboard", "all", "none"];

    /// <summary>Where the config came from (for messages and the default run name).</summary>
    public string Source { get; private set; } = "<config>";

    public bool LlmFrozen => FreezeLlm ?? Mode != TrainMode.Full;
    public bool UsesLora => Mode != TrainMode.Full;
    /// <summary>The vision tower learns: unfrozen, or through vision LoRA.</summary>
    public bool TrainsVision => !FreezeVision || VisionLoraR > 0;
    public string RunName => Name ?? Path.GetFileNameWithoutExtension(Source);
    public string ResolvedWorkDir => WorkDir ?? Path.Combine("work_dirs", RunName);
    public string ResolvedVisionCacheDir => VisionCacheDir ?? Path.Combine(ResolvedWorkDir, "vision_cache");
    public bool Evaluates => EvalData.Count > 0;
    /// <summary>Iterations between evaluations (0: only at the end).</summary>
    public long ResolvedEvalSteps => EvalSteps ?? SaveSteps;

    private sealed record Field(string Key, string Kind, Func<TrainConfig, object?> Get, Func<TrainConfig, YamlNode, string?> Set);

    private static readonly Field[] Fields =
    [
        Str("model", (c, v) => c.Model = v, c => c.Model),
        StrList("data", (c, v) => c.Data = v!, c => c.Data),
        OptStr("image_root", (c, v) => c.ImageRoot = v, c => c.ImageRoot),
        OptStr("template", (c, v) => c.Template = v, c => c.Template),
        OptStr("system_message", (c, v) => c.SystemMessage = v, c => c.SystemMessage),
        Int("max_length", (c, v) => c.MaxLength = v, c => c.MaxLength),
        OptInt("min_dynamic_patch", (c, v) => c.MinDynamicPatch = v, c => c.MinDynamicPatch),
        OptInt("max_dynamic_patch", (c, v) => c.MaxDynamicPatch = v, c => c.MaxDynamicPatch),
        OptBool("use_thumbnail", (c, v) => c.UseThumbnail = v, c => c.UseThumbnail),
        Enum<TrainMode>("mode", (c, v) => c.Mode = v, c => c.Mode),
        Bool("freeze_vision", (c, v) => c.FreezeVision = v, c => c.FreezeVision),
        Bool("freeze_projector", (c, v) => c.FreezeProjector = v, c => c.FreezeProjector),
        OptBool("freeze_llm", (c, v) => c.FreezeLlm = v, c => c.FreezeLlm),
        Int("lora_r", (c, v) => c.LoraR = v, c => c.LoraR),
        Num("lora_alpha", (c, v) => c.LoraAlpha = v, c => c.LoraAlpha),
        Num("lora_dropout", (c, v) => c.LoraDropout = v, c => c.LoraDropout),
        StrList("lora_targets", (c, v) => c.LoraTargets = v, c => c.LoraTargets, nullMeansDefault: true),
        Int("vision_lora_r", (c, v) => c.VisionLoraR = v, c => c.VisionLoraR),
        Num("vision_lora_alpha", (c, v) => c.VisionLoraAlpha = v, c => c.VisionLoraAlpha),
        StrList("vision_lora_targets", (c, v) => c.VisionLoraTargets = v!, c => c.VisionLoraTargets),
        Num("lr", (c, v) => c.Lr = v, c => c.Lr),
        NumList("betas", (c, v) => c.Betas = v, c => c.Betas),
        Num("weight_decay", (c, v) => c.WeightDecay = v, c => c.WeightDecay),
        Num("max_norm", (c, v) => c.MaxNorm = v, c => c.MaxNorm),
        Num("warmup_ratio", (c, v) => c.WarmupRatio = v, c => c.WarmupRatio),
        Int("batch_size", (c, v) => c.BatchSize = v, c => c.BatchSize),
        Int("accumulative_counts", (c, v) => c.AccumulativeCounts = v, c => c.AccumulativeCounts),
        OptInt("max_epochs", (c, v) => c.MaxEpochs = v, c => c.MaxEpochs),
        OptLong("max_steps", (c, v) => c.MaxSteps = v, c => c.MaxSteps),
        Bool("gradient_checkpointing", (c, v) => c.GradientCheckpointing = v, c => c.GradientCheckpointing),
        Bool("group_by_length", (c, v) => c.GroupByLength = v, c => c.GroupByLength),
        Bool("pack_to_max_length", (c, v) => c.PackToMaxLength = v, c => c.PackToMaxLength),
        OptInt("pad_to_multiple_of", (c, v) => c.PadToMultipleOf = v, c => c.PadToMultipleOf),
        Int("dataloader_num_workers", (c, v) => c.DataloaderNumWorkers = v, c => c.DataloaderNumWorkers),
        Bool("cache_vision_features", (c, v) => c.CacheVisionFeatures = v, c => c.CacheVisionFeatures),
        OptStr("vision_cache_dir", (c, v) => c.VisionCacheDir = v, c => c.VisionCacheDir),
        Int("loss_chunk_size", (c, v) => c.LossChunkSize = v, c => c.LossChunkSize),
        Int("seed", (c, v) => c.Seed = v, c => c.Seed),
        Str("device", (c, v) => c.Device = v, c => c.Device),
        Str("dtype", (c, v) => c.Dtype = v, c => c.Dtype),
        Enum<NanPolicy>("nan_policy", (c, v) => c.NanPolicy = v, c => c.NanPolicy),
        Str("optim", (c, v) => c.Optim = v, c => c.Optim),
        Int("zero_stage", (c, v) => c.ZeroStage = v, c => c.ZeroStage),
        Int("dist_timeout_s", (c, v) => c.DistTimeoutS = v, c => c.DistTimeoutS),
        Bool("optimizer_offload", (c, v) => c.OptimizerOffload = v, c => c.OptimizerOffload),
        Bool("quantize_vision", (c, v) => c.QuantizeVision = v, c => c.QuantizeVision),
        Bool("activation_offload", (c, v) => c.ActivationOffload = v, c => c.ActivationOffload),
        StrList("eval_data", (c, v) => c.EvalData = v ?? [], c => c.EvalData, nullMeansDefault: true),
        OptLong("eval_steps", (c, v) => c.EvalSteps = v, c => c.EvalSteps),
        OptInt("eval_max_samples", (c, v) => c.EvalMaxSamples = v, c => c.EvalMaxSamples),
        Int("eval_generate", (c, v) => c.EvalGenerate = v, c => c.EvalGenerate),
        Int("eval_max_new_tokens", (c, v) => c.EvalMaxNewTokens = v, c => c.EvalMaxNewTokens),
        Bool("save_best", (c, v) => c.SaveBest = v, c => c.SaveBest),
        OptStr("name", (c, v) => c.Name = v, c => c.Name),
        OptStr("work_dir", (c, v) => c.WorkDir = v, c => c.WorkDir),
        Int("log_interval", (c, v) => c.LogInterval = v, c => c.LogInterval),
        Long("save_steps", (c, v) => c.SaveSteps = v, c => c.SaveSteps),
        Int("save_total_limit", (c, v) => c.SaveTotalLimit = v, c => c.SaveTotalLimit),
        OptNum("peak_tflops", (c, v) => c.PeakTflops = v, c => c.PeakTflops),
        StrList("report_to", (c, v) => c.ReportTo = v!, c => c.ReportTo),
    ];

    public static IReadOnlyList<string> Keys => Fields.Select(f => f.Key).ToList();

    /// <summary>Reads a config file and applies <c>key=value</c> overrides; throws <see cref="ConfigException"/> listing every problem.</summary>
    public static TrainConfig Load(string path, IEnumerable<string>? overrides = null)
    {
        if (!File.Exists(path)) throw new ConfigException(path, [$"config file not found: {Path.GetFullPath(path)}"]);
        return Parse(File.ReadAllText(path), path, overrides);
    }

    public static TrainConfig Parse(string yaml, string source, IEnumerable<string>? overrides = null)
    {
        var config = new TrainConfig { Source = source };
        var problems = new List<string>();
        var byKey = Fields.ToDictionary(f => f.Key, StringComparer.Ordinal);
        var seen = new HashSet<string>(StringComparer.Ordinal);

        YamlMappingNode? root = null;
        try
        {
            var stream = new YamlStream();
            stream.Load(new StringReader(yaml));
            if (stream.Documents.Count > 0)
            {
                if (stream.Documents[0].RootNode is YamlMappingNode m) root = m;
                else if (!(stream.Documents[0].RootNode is YamlScalarNode s && string.IsNullOrEmpty(s.Value)))
                    problems.Add("the config must be a mapping of keys to values");
            }
        }
        catch (YamlException e)
        {
            problems.Add($"line {e.Start.Line}: invalid YAML: {e.InnerException?.Message ?? e.Message}");
        }

        foreach (var (keyNode, value) in root?.Children ?? Enumerable.Empty<KeyValuePair<YamlNode, YamlNode>>())
        {
            string key = (keyNode as YamlScalarNode)?.Value ?? "";
            string where = $"line {keyNode.Start.Line}: '{key}'";
            if (!byKey.TryGetValue(key, out var field)) { problems.Add($"{where}: unknown key{Suggest(key)}"); continue; }
            if (!seen.Add(key)) { problems.Add($"{where}: given twice"); continue; }
            if (field.Set(config, value) is { } error) problems.Add($"{where}: {error}");
        }

        foreach (var item in overrides ?? [])
        {
            int eq = item.IndexOf('=');
            if (eq <= 0) { problems.Add($"--set {item}: expected key=value"); continue; }
            string key = item[..eq].Trim(), text = item[(eq + 1)..];
            if (!byKey.TryGetValue(key, out var field)) { problems.Add($"--set {key}: unknown key{Suggest(key)}"); continue; }
            YamlNode node;
            try
            {
                var stream = new YamlStream();
                stream.Load(new StringReader($"v: {text}"));
                node = ((YamlMappingNode)stream.Documents[0].RootNode).Children[new YamlScalarNode("v")];
            }
            catch (YamlException) { node = new YamlScalarNode(text); }
            if (field.Set(config, node) is { } error) problems.Add($"--set {key}: {error}");
        }

        if (problems.Count == 0) problems.AddRange(config.Validate());
        if (problems.Count > 0) throw new ConfigException(source, problems);
        return config;
    }

    /// <summary>Checks values and combinations; every problem names its key.</summary>
    public List<string> Validate()
    {
        var p = new List<string>();
        if (string.IsNullOrWhiteSpace(Model)) p.Add("'model': required (the InternVL2 model folder)");
        if (Data.Count == 0) p.Add("'data': required (a data file, a list of files, or an InternVL meta file)");
        if (MaxLength < 2) p.Add($"'max_length': must be at least 2 (got {MaxLength})");
        if (MinDynamicPatch < 1) p.Add($"'min_dynamic_patch': must be at least 1 (got {MinDynamicPatch})");
        if (MaxDynamicPatch < MinDynamicPatch) p.Add($"'max_dynamic_patch': must be at least min_dynamic_patch ({MinDynamicPatch}), got {MaxDynamicPatch}");
        if (UsesLora && LoraR < 1) p.Add($"'lora_r': must be positive for mode {ModeName} (got {LoraR})");
        if (UsesLora && LoraAlpha <= 0) p.Add($"'lora_alpha': must be positive (got {LoraAlpha})");
        if (LoraDropout is < 0 or >= 1) p.Add($"'lora_dropout': must be in [0, 1) (got {LoraDropout})");
        if (UsesLora && LoraTargets is { Count: 0 }) p.Add($"'lora_targets': mode {ModeName} needs at least one target module");
        if (UsesLora && FreezeLlm == false) p.Add($"'freeze_llm': false contradicts mode {ModeName} (LoRA trains adapters on a frozen LLM; use mode: full to train the LLM)");
        if (VisionLoraR < 0) p.Add($"'vision_lora_r': must be 0 (off) or positive (got {VisionLoraR})");
        if (VisionLoraR > 0 && !FreezeVision) p.Add("'vision_lora_r': vision LoRA needs freeze_vision: true (the ViT would be trained twice)");
        if (Lr <= 0) p.Add($"'lr': must be positive (got {Lr})");
        if (Betas.Count != 2 || Betas.Any(b => b is < 0 or >= 1)) p.Add($"'betas': must be two numbers in [0, 1) (got [{string.Join(", ", Betas)}])");
        if (WeightDecay < 0) p.Add($"'weight_decay': must not be negative (got {WeightDecay})");
        if (MaxNorm <= 0) p.Add($"'max_norm': must be positive (got {MaxNorm})");
        if (WarmupRatio is < 0 or >= 1) p.Add($"'warmup_ratio': must be in [0, 1) (got {WarmupRatio})");
        if (BatchSize < 1) p.Add($"'batch_size': must be at least 1 (got {BatchSize})");
        if (AccumulativeCounts < 1) p.Add($"'accumulative_counts': must be at least 1 (got {AccumulativeCounts})");
        if (MaxSteps is null && MaxEpochs is null) p.Add("'max_epochs': set max_epochs or max_steps");
        if (MaxSteps is < 1) p.Add($"'max_steps': must be at least 1 (got {MaxSteps})");
        if (MaxEpochs is < 1) p.Add($"'max_epochs': must be at least 1 (got {MaxEpochs})");
        if (DataloaderNumWorkers < 0) p.Add($"'dataloader_num_workers': must not be negative (got {DataloaderNumWorkers})");
        if (CacheVisionFeatures && !FreezeVision)
            p.Add("'cache_vision_features': the vision tower is trained (freeze_vision: false), so its features change every step and a cache would serve stale ones; set freeze_vision: true or cache_vision_features: false");
        if (CacheVisionFeatures && VisionLoraR > 0)
            p.Add($"'cache_vision_features': vision LoRA (vision_lora_r: {VisionLoraR}) trains the vision tower, so its features change every step and a cache would serve stale ones; set vision_lora_r: 0 or cache_vision_features: false");
        if (PadToMultipleOf is < 1) p.Add($"'pad_to_multiple_of': must be at least 1 (got {PadToMultipleOf})");
        if (LossChunkSize < 1) p.Add($"'loss_chunk_size': must be at least 1 (got {LossChunkSize})");
        if (TensorPlacement.DeviceProblem(Device, "'device':") is { } device) p.Add(device);
        if (Dtype is not ("auto" or "bf16" or "fp32")) p.Add($"'dtype': '{Dtype}' is not auto, bf16 or fp32");
        if (Device == "cpu" && Dtype == "bf16") p.Add("'dtype': bf16 training on CPU is not supported; use fp32 (or auto)");
        if (ZeroStage is not (0 or 1)) p.Add($"'zero_stage': must be 0 or 1 (ZeRO-1: optimizer state sharded over ranks), got {ZeroStage}");
        if (OptimizerOffload && ZeroStage == 1) p.Add("'optimizer_offload': cannot be combined with zero_stage 1 (offloading already moves the whole optimizer state off the GPUs)");
        if (OptimizerOffload && Device == "cpu") p.Add("'optimizer_offload': the optimizer already runs in host memory on device cpu");
        if (OptimProblem(Optim) is { } optim) p.Add(optim);
        if (Adam8bit && OptimizerOffload)
            p.Add($"'optim': {Optim} cannot be combined with optimizer_offload (offloading already keeps the whole optimizer state in host memory, where 8-bit states save no GPU memory and step slower on the CPU); use one of the two");
        if (ActivationOffload && !GradientCheckpointing) p.Add("'activation_offload': needs gradient_checkpointing: true (it offloads the checkpointed layer inputs)");
        if (ActivationOffload && Device == "cpu") p.Add("'activation_offload': activations are already in host memory on device cpu");
        if (QuantizeVision && !FreezeVision) p.Add("'quantize_vision': needs freeze_vision: true (NF4 weights are frozen; train the ViT through vision_lora_r instead)");
        if (DistTimeoutS < 10) p.Add($"'dist_timeout_s': must be at least 10 seconds (got {DistTimeoutS})");
        if (LogInterval < 1) p.Add($"'log_interval': must be at least 1 (got {LogInterval})");
        if (SaveSteps < 0) p.Add($"'save_steps': must not be negative (got {SaveSteps})");
        if (SaveSteps > 0 && AccumulativeCounts > 0 && SaveSteps % AccumulativeCounts != 0)
            p.Add($"'save_steps': {SaveSteps} is not a multiple of accumulative_counts ({AccumulativeCounts}); checkpoints are taken after optimizer steps");
        if (EvalSteps < 0) p.Add($"'eval_steps': must not be negative (got {EvalSteps})");
        if (EvalSteps > 0 && AccumulativeCounts > 0 && EvalSteps % AccumulativeCounts != 0)
            p.Add($"'eval_steps': {EvalSteps} is not a multiple of accumulative_counts ({AccumulativeCounts}); evaluations follow optimizer steps");
        if (EvalMaxSamples < 1) p.Add($"'eval_max_samples': must be at least 1 or null (got {EvalMaxSamples})");
        if (EvalGenerate < 0) p.Add($"'eval_generate': must not be negative (got {EvalGenerate})");
        if (EvalMaxNewTokens < 1) p.Add($"'eval_max_new_tokens': must be at least 1 (got {EvalMaxNewTokens})");
        if (SaveBest && EvalData.Count == 0) p.Add("'save_best': needs eval_data (the best checkpoint is the one of the lowest eval loss)");
        if (Mode == TrainMode.Full && LlmFrozen && FreezeVision && FreezeProjector && VisionLoraR == 0)
            p.Add("'mode': full with freeze_llm, freeze_vision and freeze_projector all true trains nothing");
        if (PeakTflops is <= 0) p.Add($"'peak_tflops': must be positive (got {PeakTflops})");
        foreach (var r in ReportTo.Where(r => !Integrations.Contains(r)).Distinct())
            p.Add($"'report_to': '{r}' is not an integration vlmtune writes (use {string.Join(", ", Integrations)}; a list is accepted)");
        if (ReportTo.Contains("none") && ReportTo.Count > 1) p.Add($"'report_to': none cannot be combined with [{string.Join(", ", ReportTo)}]");
        if (Name is { } n && (n.Length == 0 || n.IndexOfAny(Path.GetInvalidFileNameChars()) >= 0 || n is "." or ".."))
            p.Add($"'name': '{n}' cannot name a folder");
        return p;
    }

    private string ModeName => Mode.ToString().ToLowerInvariant();

    /// <summary>A copy with the defaults that depend on other keys written out (name, work_dir, freeze_llm, dtype, vision_cache_dir).</summary>
    public TrainConfig Resolved()
    {
        var c = (TrainConfig)MemberwiseClone();
        c.Name = RunName;
        c.WorkDir = ResolvedWorkDir;
        c.FreezeLlm = LlmFrozen;
        if (Dtype == "auto") c.Dtype = Device == "cpu" ? "fp32" : "bf16";
        if (CacheVisionFeatures) c.VisionCacheDir = ResolvedVisionCacheDir;
        c.Data = [.. Data]; c.EvalData = [.. EvalData]; c.EvalSteps = ResolvedEvalSteps; c.LoraTargets = LoraTargets is null ? null : [.. LoraTargets]; c.VisionLoraTargets = [.. VisionLoraTargets]; c.Betas = [.. Betas]; c.ReportTo = [.. ReportTo];
        return c;
    }

    /// <summary>The config as YAML (every key, in the documented order).</summary>
    public string ToYaml()
    {
        var sb = new StringBuilder();
        foreach (var f in Fields) sb.Append(f.Key).Append(": ").Append(FormatValue(f.Get(this))).Append('\n');
        return sb.ToString();
    }

    private static string FormatValue(object? v) => v switch
    {
        null => "null",
        bool b => b ? "true" : "false",
        string s => Quote(s),
        double d => d.ToString("R", CultureInfo.InvariantCulture),
        IEnumerable<string> list => "[" + string.Join(", ", list.Select(Quote)) + "]",
        IEnumerable<double> list => "[" + string.Join(", ", list.Select(d => d.ToString("R", CultureInfo.InvariantCulture))) + "]",
        Enum e => e.ToString().ToLowerInvariant(),
        IFormattable f => f.ToString(null, CultureInfo.InvariantCulture),
        _ => v.ToString() ?? "null",
    };

    private static string Quote(string s) => "'" + s.Replace("'", "''") + "'";

    private static string Suggest(string key)
    {
        var close = Fields.Select(f => f.Key).OrderBy(k => Distance(k, key)).First();
        return Distance(close, key) <= Math.Max(2, key.Length / 3) ? $" (did you mean '{close}'?)" : $" (known keys: {string.Join(", ", Keys)})";
    }

    private static int Distance(string a, string b)
    {
        var d = new int[a.Length + 1, b.Length + 1];
        for (int i = 0; i <= a.Length; i++) d[i, 0] = i;
        for (int j = 0; j <= b.Length; j++) d[0, j] = j;
        for (int i = 1; i <= a.Length; i++)
            for (int j = 1; j <= b.Length; j++)
                d[i, j] = Math.Min(Math.Min(d[i - 1, j] + 1, d[i, j - 1] + 1), d[i - 1, j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1));
        return d[a.Length, b.Length];
    }

    // ---- field binders: each returns null, or what is wrong with the value ----

    private static bool IsNull(YamlNode n) => n is YamlScalarNode { Style: ScalarStyle.Plain, Value: null or "" or "~" or "null" or "Null" or "NULL" };

    private static string? ScalarText(YamlNode n) => n is YamlScalarNode s ? s.Value : null;

    private static Field Str(string key, Action<TrainConfig, string> set, Func<TrainConfig, object?> get) =>
        new(key, "string", get, (c, n) =>
        {
            if (IsNull(n) || ScalarText(n) is not { } s) return "expected a string";
            set(c, s); return null;
        });

    private static Field OptStr(string key, Action<TrainConfig, string?> set, Func<TrainConfig, object?> get) =>
        new(key, "string", get, (c, n) =>
        {
            if (IsNull(n)) { set(c, null); return null; }
            if (ScalarText(n) is not { } s) return "expected a string";
            set(c, s); return null;
        });

    /// <param name="nullMeansDefault">A null value (what the resolved config writes for "the default") resets the field to null.</param>
    private static Field StrList(string key, Action<TrainConfig, List<string>?> set, Func<TrainConfig, object?> get, bool nullMeansDefault = false) =>
        new(key, "list", get, (c, n) =>
        {
            if (nullMeansDefault && IsNull(n)) { set(c, null); return null; }
            if (n is YamlScalarNode && !IsNull(n)) { set(c, [ScalarText(n)!]); return null; }
            if (n is not YamlSequenceNode seq) return "expected a string or a list of strings";
            var items = new List<string>();
            foreach (var item in seq)
            {
                if (item is not YamlScalarNode s || s.Value is null) return "expected a list of strings";
                items.Add(s.Value);
            }
            set(c, items); return null;
        });

    private static Field NumList(string key, Action<TrainConfig, List<double>> set, Func<TrainConfig, object?> get) =>
        new(key, "list", get, (c, n) =>
        {
            if (n is not YamlSequenceNode seq) return "expected a list of numbers, e.g. [0.9, 0.999]";
            var items = new List<double>();
            foreach (var item in seq)
            {
                if (!TryDouble(item, out var d)) return "expected a list of numbers, e.g. [0.9, 0.999]";
                items.Add(d);
            }
            set(c, items); return null;
        });

    private static bool TryDouble(YamlNode n, out double d)
    {
        d = 0;
        return n is YamlScalarNode { Style: ScalarStyle.Plain, Value: { } s } &&
               double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out d) && double.IsFinite(d);
    }

    private static bool TryLong(YamlNode n, out long v)
    {
        v = 0;
        if (n is not YamlScalarNode { Style: ScalarStyle.Plain, Value: { } s }) return false;
        if (long.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture, out v)) return true;
        // 1e3 style integers are accepted when exact.
        if (double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out var d) && d == Math.Floor(d) && Math.Abs(d) < 9e15) { v = (long)d; return true; }
        return false;
    }

    private static Field Num(string key, Action<TrainConfig, double> set, Func<TrainConfig, object?> get) =>
        new(key, "number", get, (c, n) =>
        {
            if (!TryDouble(n, out var d)) return $"expected a number, got {Describe(n)}";
            set(c, d); return null;
        });

    private static Field OptNum(string key, Action<TrainConfig, double?> set, Func<TrainConfig, object?> get) =>
        new(key, "number", get, (c, n) =>
        {
            if (IsNull(n)) { set(c, null); return null; }
            if (!TryDouble(n, out var d)) return $"expected a number or null, got {Describe(n)}";
            set(c, d); return null;
        });

    private static Field Int(string key, Action<TrainConfig, int> set, Func<TrainConfig, object?> get) =>
        new(key, "integer", get, (c, n) =>
        {
            if (!TryLong(n, out var v) || v is < int.MinValue or > int.MaxValue) return $"expected an integer, got {Describe(n)}";
            set(c, (int)v); return null;
        });

    private static Field OptInt(string key, Action<TrainConfig, int?> set, Func<TrainConfig, object?> get) =>
        new(key, "integer", get, (c, n) =>
        {
            if (IsNull(n)) { set(c, null); return null; }
            if (!TryLong(n, out var v) || v is < int.MinValue or > int.MaxValue) return $"expected an integer or null, got {Describe(n)}";
            set(c, (int)v); return null;
        });

    private static Field Long(string key, Action<TrainConfig, long> set, Func<TrainConfig, object?> get) =>
        new(key, "integer", get, (c, n) =>
        {
            if (!TryLong(n, out var v)) return $"expected an integer, got {Describe(n)}";
            set(c, v); return null;
        });

    private static Field OptLong(string key, Action<TrainConfig, long?> set, Func<TrainConfig, object?> get) =>
        new(key, "integer", get, (c, n) =>
        {
            if (IsNull(n)) { set(c, null); return null; }
            if (!TryLong(n, out var v)) return $"expected an integer or null, got {Describe(n)}";
            set(c, v); return null;
        });

    private static Field Bool(string key, Action<TrainConfig, bool> set, Func<TrainConfig, object?> get) =>
        new(key, "boolean", get, (c, n) =>
        {
            if (ParseBool(n) is not { } b) return $"expected true or false, got {Describe(n)}";
            set(c, b); return null;
        });

    private static Field OptBool(string key, Action<TrainConfig, bool?> set, Func<TrainConfig, object?> get) =>
        new(key, "boolean", get, (c, n) =>
        {
            if (IsNull(n)) { set(c, null); return null; }
            if (ParseBool(n) is not { } b) return $"expected true, false or null, got {Describe(n)}";
            set(c, b); return null;
        });

    private static bool? ParseBool(YamlNode n) => n is YamlScalarNode { Style: ScalarStyle.Plain, Value: { } s }
        ? s.ToLowerInvariant() switch { "true" or "yes" or "on" => true, "false" or "no" or "off" => false, _ => null }
        : null;

    private static Field Enum<T>(string key, Action<TrainConfig, T> set, Func<TrainConfig, object?> get) where T : struct, Enum =>
        new(key, "choice", get, (c, n) =>
        {
            var names = System.Enum.GetNames<T>().Select(x => x.ToLowerInvariant()).ToList();
            if (ScalarText(n) is { } s && System.Enum.TryParse<T>(s, ignoreCase: true, out var v) && names.Contains(s.ToLowerInvariant()))
            {
                set(c, v); return null;
            }
            return $"expected one of {string.Join(", ", names)}, got {Describe(n)}";
        });

    private static string Describe(YamlNode n) => n switch
    {
        YamlScalarNode s => $"'{s.Value}'",
        YamlSequenceNode => "a list",
        YamlMappingNode => "a mapping",
        _ => "an unsupported value",
    };
}

/// <summary>A training config with problems: every one of them, each naming its key (and line, from a file).</summary>
public sealed class ConfigException(string source, IReadOnlyList<string> problems)
    : VlmTuneException($"{source}: {problems.Count} problem{(problems.Count == 1 ? "" : "s")} in the training config:\n  " + string.Join("\n  ", problems))
{
    public IReadOnlyList<string> Problems { get; } = problems;
}
