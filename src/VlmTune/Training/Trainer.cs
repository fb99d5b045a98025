using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.Modules;
using VlmTune.Autograd;
using VlmTune.Checkpoints;
using VlmTune.Distributed;
using VlmTune.IO;
using VlmTune.Models;
using VlmTune.Quantization;
using VlmTune.Text;
using VlmTune.Vision;
using static TorchSharp.torch;

namespace VlmTune.Training;

public sealed record TrainerOptions
{
    /// <summary>null: start fresh; "auto": the latest complete checkpoint of the work dir (fresh if none); else a checkpoint folder.</summary>
    public string? Resume { get; init; }
    /// <summary>Receives every log line (the console).</summary>
    public Action<string>? Echo { get; init; }
    /// <summary>Called after every iteration (progress bars).</summary>
    public Action<TrainProgress>? Progress { get; init; }
    /// <summary>This process's place in a data-parallel job; null: read from the launcher's variables (RANK, WORLD_SIZE, ...).</summary>
    public DistributedEnvironment? Distributed { get; init; }
}

public sealed record TrainProgress(long Iteration, long TotalIterations, double Loss, double Lr);

public sealed class TrainResult
{
    public required string WorkDir { get; init; }
    public required string RunDir { get; init; }
    /// <summary>Iterations completed in total (including those before a resume).</summary>
    public required long Iterations { get; init; }
    public required long OptimizerSteps { get; init; }
    /// <summary>Loss of each iteration this session ran, in order (NaN for an iteration with nothing to learn).</summary>
    public required IReadOnlyList<double> Losses { get; init; }
    public string? LastCheckpoint { get; init; }
    public required DataCounters Counters { get; init; }
    /// <summary>Stopped early by cancellation (Ctrl-C); a checkpoint was saved.</summary>
    public bool Interrupted { get; init; }
}

/// <summary>A non-finite loss or gradient norm stopped the run (nan_policy: stop).</summary>
public sealed class TrainingDivergedException(string message) : VlmTuneException(message);

/// <summary>
/// The fine-tuning recipe (full, LoRA, QLoRA) of InternVL2, as XTuner runs it: <see cref="Setup"/> validates everything,
/// loads the model, applies the mode and builds the data index; <see cref="Train"/> runs iterations of
/// forward/backward with gradient accumulation, AdamW with clipping, the warm-up + cosine schedule per iteration,
/// logging and checkpoints; <see cref="SaveCheckpoint"/> writes a resumable checkpoint. See docs/training.md.
/// </summary>
public sealed class Trainer(TrainConfig config, TrainerOptions? options = null) : IDisposable
{
    public const string StateFile = "trainer_state.json";
    public const string TrainableFile = TrainedWeights.FileName;
    public const string OptimizerFile = "optimizer.bin";
    public const string VisionAdapterDir = "vision_lora";
    public const string LastCheckpointFile = "last_checkpoint";

    private readonly TrainerOptions _options = options ?? new TrainerOptions();
    private InternVLChatModel? _model;
    private TextTokenizer? _tokenizer;
    private SampleEncoder? _encoder;
    private VisionFeatureCache? _visionCache;
    private TrainDataset? _dataset;
    private BatchPlan? _plan;
    private OptimizerHelper? _optimizer;
    private List<(string Name, Parameter Param)> _trainable = [];
    private MasterWeights? _masters;
    private LrSchedule? _schedule;
    private TrainLog? _log;
    private DropoutSeeds? _seeds;
    private Device _device = CPU;
    private ScalarType _dtype = ScalarType.Float32;
    private long _iteration;
    private long _optimizerSteps;
    private long _llmParams, _vitParams;
    private PeftAdapterConfig? _llmLora, _visionLora;
    private string? _lastCheckpoint;
    private DistributedEnvironment _env = DistributedEnvironment.Single;
    private DataParallel? _dp;
    private ZeroPartition? _zero;
    private bool _stopAgreed;

    public TrainConfig Config { get; } = config;
    public DataCounters Counters { get; } = new();
    public InternVLChatModel Model => _model ?? throw new InvalidOperationException("call Setup() first.");
    public TrainDataset Dataset => _dataset ?? throw new InvalidOperationException("call Setup() first.");
    public SampleEncoder Encoder => _encoder ?? throw new InvalidOperationException("call Setup() first.");
    /// <summary>The vision feature cache (cache_vision_features), or null.</summary>
    public VisionFeatureCache? VisionCache => _visionCache;
    /// <summary>Image tiles this process ran through the vision tower (cached ones skip it).</summary>
    public long VisionTowerTiles { get; private set; }
    /// <summary>Samples with images this process trained on, and those of them whose features came from the vision cache.</summary>
    public long ImageSamples { get; private set; }
    public long ImageSamplesFromCache { get; private set; }
    public long TotalIterations { get; private set; }
    public long Iteration => _iteration;
    public string WorkDir => Path.GetFullPath(Config.ResolvedWorkDir);
    public string RunDir => _log?.RunDir ?? "";
    public int Rank => _env.Rank;
    public int WorldSize => _env.WorldSize;
    private bool IsMaster => _env.IsMaster;

    private bool VisionTrainable => !Config.FreezeVision || Config.VisionLoraR > 0;

    /// <summary>
    /// LoRA weights are fp32 (PEFT), computed autocast in bf16 runs; with the optimizer offloaded they are held in the
    /// model's dtype on the GPU and their fp32 masters in host memory.
    /// </summary>
    private ScalarType LoraDType => Config.OptimizerOffload ? _dtype : ScalarType.Float32;

    public void Setup()
    {
        _env = _options.Distributed ?? DistributedEnvironment.FromProcess();
        // Each rank sees only its own GPU, before anything initialises CUDA (CheckInputs asks whether CUDA is there).
        if (_env.IsDistributed && Config.Device.StartsWith("cuda", StringComparison.Ordinal)) DataParallel.BindLocalGpu(_env);
        var resumeDir = CheckInputs();
        _device = torch.device(Config.Device);
        _dtype = Config.Dtype switch { "bf16" => ScalarType.BFloat16, "fp32" => ScalarType.Float32, _ => ModelOptions.DefaultDType(_device) };
        manual_seed(Config.Seed);

        Directory.CreateDirectory(WorkDir);
        _log = IsMaster ? new TrainLog(WorkDir, Config.Resolved().ToYaml()) { Echo = _options.Echo } : TrainLog.ForOtherRank(Rank, _options.Echo);
        if (IsMaster) CheckpointFiles.RemoveStaleTemporaries(WorkDir, _log.Info);
        _log.Info($"vlmtune train: {Config.Source} (mode {Config.Mode.ToString().ToLowerInvariant()}, device {Config.Device}, {(_dtype == ScalarType.BFloat16 ? "bf16" : "fp32")}); run folder {_log.RunDir}");
        if (_env.IsDistributed)
        {
            _dp = DataParallel.Start(_env, _device, TimeSpan.FromSeconds(Config.DistTimeoutS));
            _log.Info($"data parallel: {WorldSize} ranks ({_env.Source}, {_env.NodeCount} node(s)), {_dp.Backend}, " +
                      $"ZeRO stage {Config.ZeroStage}; global batch {Config.BatchSize} × {WorldSize} ranks × accumulation {Config.AccumulativeCounts}");
        }
        try { SetupModelAndData(resumeDir); }
        catch (Exception e) when (_dp is not null && e is not DistributedException)
        {
            _dp.Abort($"setup failed: {e.Message}");
            throw;
        }
    }

    private void SetupModelAndData(string? resumeDir)
    {
        var log = _log!;

        _model = InternVLModelLoader.Load(Config.Model, new ModelOptions { Device = _device, DType = _dtype });
        _tokenizer = TextTokenizer.Load(Config.Model);
        var template = ConversationTemplate.Get(Config.Template ?? _model.Config.Template);
        if ((Config.SystemMessage ?? _model.Config.SystemMessage) is { } system) template = template with { SystemMessage = system };
        var tokenizer = new ConversationTokenizer(_tokenizer, template, _model.Config.NumImageToken, Config.MaxLength);
        var modelTiling = VlmTune.Data.ModelTiling.ImageOptions(_model.Config);
        var images = modelTiling with
        {
            MinTiles = Config.MinDynamicPatch ?? modelTiling.MinTiles, MaxTiles = Config.MaxDynamicPatch ?? modelTiling.MaxTiles,
            UseThumbnail = Config.UseThumbnail ?? modelTiling.UseThumbnail,
        };
        log.Info($"template {template.Name}; tiles per image {images.MinTiles}–{images.MaxTiles}{(images.UseThumbnail ? " + thumbnail" : "")} ({(Config.MaxDynamicPatch is null ? "the model's config.json" : "the training config")})");
        if (Config.CacheVisionFeatures)
        {
            _visionCache = VisionFeatureCache.Open(Config.ResolvedVisionCacheDir, Config.Model, _model.Config, _dtype, Config.QuantizeVision, m => log.Warning(m));
            log.Info($"vision feature cache: {_visionCache.Directory} ({_visionCache.EntriesAtOpen} entries, {_visionCache.BytesAtOpen / 1048576.0:F1} MiB); " +
                     $"the frozen ViT's features of each sample's images are stored on first use and reused (model fingerprint {_visionCache.ModelFingerprint[..12]})");
        }
        _encoder = new SampleEncoder(tokenizer, images, Counters, m => log.Warning(m)) { VisionCache = _visionCache };

        _dataset = TrainDataset.Build(Config.Data, Config.ImageRoot, _encoder, Counters, m => log.Warning(m), Math.Max(1, Config.DataloaderNumWorkers));
        if (_dataset.Samples.Count == 0)
            throw new VlmTuneException($"no usable training sample in {string.Join(", ", Config.Data)} ({Counters}); see the warnings above.");
        _plan = new BatchPlan(_dataset, Config.BatchSize, Config.Seed, Config.GroupByLength, Rank, WorldSize);
        TotalIterations = Config.MaxSteps ?? Config.MaxEpochs!.Value * _plan.BatchesPerEpoch;
        log.Info($"data: {_dataset.Samples.Count} samples ({_dataset.Lengths.Count(l => l > 0)} with images), {_plan.BatchesPerEpoch} iterations per epoch, " +
                  $"{TotalIterations} iterations, {(TotalIterations + Config.AccumulativeCounts - 1) / Config.AccumulativeCounts} optimizer steps; skipped so far: {Counters}");

        if (Config.PackToMaxLength)
        {
            var packing = SequencePacker.Estimate(_plan, _dataset.Lengths, Config.MaxLength);
            log.Info($"packing: the {Config.BatchSize} samples of each micro-batch share rows of at most max_length {Config.MaxLength} tokens; " +
                      $"epoch 1{(WorldSize > 1 ? $" on rank {Rank}" : "")}: {packing.RowsPerBatch:0.00} rows per micro-batch, padding {100 * packing.PackedPadding:0.0}% of the token slots (unpacked {100 * packing.UnpackedPadding:0.0}%)");
        }

        PrepareModel();
        _schedule = new LrSchedule(Config.Lr, TotalIterations, Config.WarmupRatio);
        // Ranks draw different dropout masks (as they would on different samples); rank 0's are the single-process ones.
        _seeds = new DropoutSeeds(Config.Seed + Rank * 1_000_003L);
        ActivationCheckpointing.Apply(_model.language_model, Config.GradientCheckpointing, _seeds, _dp is null ? null : _dp.LayerGradientsReady, Config.ActivationOffload);
        var optimized = _trainable;
        if (_dp is not null)
        {
            // Initial trainable weights (LoRA's random A, ...) are rank 0's everywhere.
            _dp.BroadcastFromOwners(_trainable.Select(t => ((Tensor)t.Param, 0)).ToList());
            _dp.Prepare(_trainable);
            if (Config.ZeroStage == 1)
            {
                _zero = ZeroPartition.Plan(_trainable.Select(t => (t.Name, t.Param.numel())).ToList(), WorldSize);
                optimized = _trainable.Where(t => _zero.Owner[t.Name] == Rank).ToList();
                log.Info($"zero-1: rank {Rank} keeps the optimizer state of {optimized.Count} of {_trainable.Count} tensors " +
                          $"({optimized.Sum(t => t.Param.numel()):N0} parameters; load imbalance {_zero.Imbalance:F2})");
                if (optimized.Count == 0)
                    throw new VlmTuneException($"zero_stage 1: rank {Rank} owns no trainable tensor ({_trainable.Count} tensors over {WorldSize} ranks); use zero_stage: 0.");
            }
            string overlap = _dp.Backend != "nccl" ? "summed after the backward pass (CPU tensors)"
                : Config.GradientCheckpointing ? "each all-reduced during the backward pass as soon as its layer is done"
                : "all-reduced after the backward pass (overlap needs gradient_checkpointing)";
            log.Info($"gradients reduced in {_dp.BucketCount} buckets (one per decoder layer, one for the rest), {overlap}");
        }
        _masters = MasterWeights.Create(optimized, Config.OptimizerOffload ? CPU : null);
        if (Config.OptimizerOffload)
            log.Info($"optimizer offload: fp32 masters and AdamW state of {optimized.Sum(t => t.Param.numel()):N0} parameters in host memory, AdamW on the CPU");
        else if (_masters.Any) log.Info("bf16 weights are trained through fp32 master copies (the optimizer updates the masters)");
        _optimizer = optim.AdamW(_masters.OptimizerParameters, Config.Lr, Config.Betas[0], Config.Betas[1], 1e-8, Config.WeightDecay);

        if (resumeDir is not null) Resume(resumeDir);
    }

    /// <summary>Checks paths and the device before any work; every problem at once.</summary>
    private string? CheckInputs()
    {
        var problems = new List<string>();
        if (!Directory.Exists(Config.Model)) problems.Add($"'model': folder not found: {Path.GetFullPath(Config.Model)}");
        else if (!File.Exists(Path.Combine(Config.Model, "config.json"))) problems.Add($"'model': {Path.GetFullPath(Config.Model)} has no config.json (not an InternVL2 model folder)");
        foreach (var file in Config.Data)
        {
            if (!File.Exists(file)) { problems.Add($"'data': file not found: {Path.GetFullPath(file)}"); continue; }
            try
            {
                var format = VlmTune.Data.TrainingData.DetectFormat(file);
                if (Config.ImageRoot is not null && format == VlmTune.Data.DataFileFormat.Meta)
                    problems.Add($"'image_root': {file} is an InternVL meta file whose datasets name their own 'root'; leave image_root out");
            }
            catch (VlmTuneException e) { problems.Add($"'data': {e.Message}"); }
        }
        if (Config.Template is not null && !ConversationTemplate.KnownNames.Contains(Config.Template))
            problems.Add($"'template': unknown conversation template '{Config.Template}' (known: {string.Join(", ", ConversationTemplate.KnownNames)})");
        if (Config.ImageRoot is { } root && !Directory.Exists(root)) problems.Add($"'image_root': folder not found: {Path.GetFullPath(root)}");
        problems.AddRange(CheckpointFiles.WorkDirProblems(Config));
        // TrainConfig.Parse refuses a cache over a trained ViT; a config built in code is checked here too.
        problems.AddRange(Config.Validate().Where(p => p.StartsWith("'cache_vision_features'", StringComparison.Ordinal)));
        if (Config.CacheVisionFeatures && File.Exists(Config.ResolvedVisionCacheDir))
            problems.Add($"'vision_cache_dir': {Path.GetFullPath(Config.ResolvedVisionCacheDir)} is a file, not a folder");
        if (_env.IsDistributed && Config.Device.StartsWith("cuda:", StringComparison.Ordinal))
            problems.Add($"'device': {Config.Device} with {_env.WorldSize} processes; each rank uses its own GPU (LOCAL_RANK), so set device: cuda");
        if (Config.Device.StartsWith("cuda", StringComparison.Ordinal) && !cuda.is_available())
            problems.Add($"'device': {Config.Device} but CUDA is not available to TorchSharp (CPU libtorch, or no GPU); use --set device=cpu");
        string? resume = null;
        try { resume = FindResume(); }
        catch (VlmTuneException e) { problems.Add(e.Message); }
        if (problems.Count > 0) throw new ConfigException(Config.Source, problems);
        return resume;
    }

    private string? FindResume()
    {
        switch (_options.Resume)
        {
            case null: return null;
            case "auto":
                return LatestCheckpoint(WorkDir);
            default:
                string dir = Path.GetFullPath(_options.Resume);
                if (!Directory.Exists(dir)) throw new VlmTuneException($"--resume: checkpoint folder not found: {dir}");
                if (!File.Exists(Path.Combine(dir, StateFile)))
                    throw new VlmTuneException($"--resume: {dir} is not a complete VlmTune checkpoint (no {StateFile}); pass an iter_<n> folder of a work dir, or --resume auto");
                return dir;
        }
    }

    /// <summary>The newest complete checkpoint under <paramref name="workDir"/> (temporary folders of interrupted writes are ignored), or null.</summary>
    public static string? LatestCheckpoint(string workDir)
    {
        if (!Directory.Exists(workDir)) return null;
        string pointer = Path.Combine(workDir, LastCheckpointFile);
        if (File.Exists(pointer))
        {
            string dir = File.ReadAllText(pointer).Trim();
            if (!Path.IsPathRooted(dir)) dir = Path.Combine(workDir, dir);
            if (File.Exists(Path.Combine(dir, StateFile))) return Path.GetFullPath(dir);
        }
        return Checkpoints(workDir).LastOrDefault().Dir;
    }

    private static List<(long Iter, string Dir)> Checkpoints(string workDir) =>
        Directory.EnumerateDirectories(workDir, "iter_*")
            .Select(d => (Dir: d, Name: Path.GetFileName(d)))
            .Where(d => long.TryParse(d.Name["iter_".Length..], out _) && File.Exists(Path.Combine(d.Dir, StateFile)))
            .Select(d => (long.Parse(d.Name["iter_".Length..]), Path.GetFullPath(d.Dir)))
            .OrderBy(d => d.Item1).ToList();

    /// <summary>Applies the mode: quantisation, LoRA branches, what is frozen; collects the trainable parameters.</summary>
    private void PrepareModel()
    {
        var model = Model;
        foreach (var p in model.parameters()) p.requires_grad_(false);
        _llmParams = model.language_model.LayerStack.parameters().Sum(p => p.numel());
        _vitParams = model.vision_model.parameters().Sum(p => p.numel());

        if (Config.Mode == TrainMode.Qlora)
        {
            int n = Qlora.QuantizeLanguageModel(model.language_model).Count;
            _log!.Info($"qlora: {n} LLM linear layers stored as NF4 (block 64, double-quantised absmax)");
        }
        if (Config.QuantizeVision)
        {
            int n = Qlora.QuantizeVisionModel(model.vision_model).Count;
            _log!.Info($"quantize_vision: {n} ViT linear layers stored as NF4");
        }
        if (Config.UsesLora)
        {
            var llm = model.language_model;
            List<string> targets = [.. Config.LoraTargets ?? llm.DefaultLoraTargets];
            if (llm.OutputHeadName is null && Config.LoraTargets is { } asked && asked.Any(t => t is "lm_head" or "output"))
                throw new VlmTuneException($"{Config.Model}: 'lora_targets' names the output head, but this model ties it to the token embeddings (tie_word_embeddings); leave it out.");
            _llmLora = new PeftAdapterConfig
            {
                R = Config.LoraR, LoraAlpha = Config.LoraAlpha, LoraDropout = Config.LoraDropout, TargetModules = targets,
                BaseModelNameOrPath = Path.GetFullPath(Config.Model),
            };
            var names = PeftAdapter.Attach(llm, _llmLora, LoraDType);
            _log!.Info($"lora: r={Config.LoraR} alpha={Config.LoraAlpha} dropout={Config.LoraDropout} on {names.Count} LLM layers ({string.Join(", ", targets)})");
        }
        if (Config.VisionLoraR > 0)
        {
            _visionLora = new PeftAdapterConfig
            {
                R = Config.VisionLoraR, LoraAlpha = Config.VisionLoraAlpha, LoraDropout = Config.LoraDropout, TargetModules = Config.VisionLoraTargets,
                BaseModelNameOrPath = Path.GetFullPath(Config.Model), TaskType = null,
            };
            PeftAdapter.Attach(model.vision_model, _visionLora, LoraDType);
        }
        if (!Config.FreezeVision) foreach (var p in model.vision_model.parameters()) p.requires_grad_(true);
        if (!Config.FreezeProjector) foreach (var p in model.mlp1.parameters()) p.requires_grad_(true);
        if (!Config.LlmFrozen) foreach (var p in model.language_model.parameters()) p.requires_grad_(true);
        foreach (var (name, p) in model.named_parameters())
            if (name.Contains(".lora_")) p.requires_grad_(true);

        // bf16 training computes LoRA branches in bf16 with fp32 weights, as XTuner's DeepSpeed bf16 does.
        if (_dtype != ScalarType.Float32)
            foreach (var linear in model.modules().OfType<VlmTune.Models.Linear>().Where(l => l.HasLora)) linear.LoraAutocast = true;

        _trainable = model.named_parameters().Where(p => p.parameter.requires_grad).Select(p => (p.name, p.parameter)).ToList();
        if (_trainable.Count == 0) throw new VlmTuneException($"{Config.Source}: the config trains nothing (every part is frozen).");
        long count = _trainable.Sum(t => t.Param.numel());
        _log!.Info($"trainable parameters: {count:N0} in {_trainable.Count} tensors ({string.Join(", ", _trainable.Select(t => t.Name.Split('.')[0]).Distinct())})");

        model.eval();
        model.language_model.train();                 // LoRA dropout
        if (VisionTrainable) model.vision_model.train();
    }

    /// <summary>Runs the remaining iterations. Cancellation (Ctrl-C) stops at the next iteration and saves a checkpoint.</summary>
    public TrainResult Train(CancellationToken cancel = default, Action<TrainProgress>? progress = null)
    {
        progress ??= _options.Progress;
        if (_model is null) Setup();
        var model = Model;
        var log = _log!;
        int accum = Config.AccumulativeCounts;
        var losses = new List<double>();
        bool interrupted = false;
        bool cuda = _device.type == DeviceType.CUDA;
        using var gpuMemory = cuda ? new VlmTune.Diagnostics.GpuMemoryMonitor(_device.index < 0 ? 0 : _device.index) : null;
        double? peak = Config.PeakTflops ?? (cuda ? 989.0 : null);
        int imageContextId = _tokenizer!.ImgContextId;
        long start = _iteration;
        var runClock = Stopwatch.StartNew();
        var window = new Window();
        (long Images, long FromCache) windowStart = (0, 0);
        double? lastGradNorm = null;
        var cycleSamples = new List<string>();

        if (gpuMemory is { Available: true })
            log.Info($"memory column: {gpuMemory.SourceDescription}, MiB; {gpuMemory.CurrentBytes / (1024 * 1024)} MiB in use before the first step");
        log.Info($"training iterations {start + 1}..{TotalIterations} (batch {Config.BatchSize}{(WorldSize > 1 ? $" × {WorldSize} ranks" : "")} × accumulation {accum}, lr {Config.Lr:g}, warm-up {_schedule!.WarmupIterations} iterations)");
        using var loader = new BatchLoader(Dataset, _plan!, _encoder!, _tokenizer.PadId, start, TotalIterations, Config.DataloaderNumWorkers,
            Config.PackToMaxLength ? Config.MaxLength : null);
        try
        {
            while (_iteration < TotalIterations)
            {
                _dp?.Heartbeat();
                InjectedFault.At(Rank, _iteration);
                // Ranks stop together, at the iteration after any of them was asked to (the request travels with the
                // per-iteration agreement), or the others would wait in a collective for it.
                if (_dp is null ? cancel.IsCancellationRequested : _stopAgreed)
                {
                    interrupted = true;
                    break;
                }
                var clock = Stopwatch.StartNew();
                long it = _iteration;
                long cycleStart = it / accum * accum;
                long cycleSize = Math.Min(accum, TotalIterations - cycleStart);
                double lr = _schedule.At(it);
                foreach (var group in _optimizer!.ParamGroups) group.LearningRate = lr;
                _seeds!.StartMicroBatch(it);
                VlmTune.Diagnostics.MemoryTrace.BeginIteration(it + 1, gpuMemory);
                manual_seed(_seeds.ForMicroBatch());   // dropout outside checkpointed layers: same masks after a resume

                using var batch = loader.Next();
                double dataTime = clock.Elapsed.TotalSeconds;
                bool stepNow = it + 1 == cycleStart + cycleSize;
                if (batch.IsEmpty && _dp is null)
                    log.Warning($"iteration {it + 1}: every sample of the batch was skipped; nothing to learn");
                cycleSamples.AddRange(batch.SampleIds);
                var (loss, tokens, tiles) = ForwardBackward(batch, imageContextId, cycleSize, it, stepNow, cancel);

                if (stepNow)
                {
                    lastGradNorm = OptimizerStep(it, cycleSamples);
                    VlmTune.Diagnostics.MemoryTrace.Mark("optimizer step");
                    cycleSamples.Clear();
                }
                _iteration++;
                losses.Add(loss);
                double time = clock.Elapsed.TotalSeconds;
                window.Add(time, dataTime, loss, tokens, tiles);
                progress?.Invoke(new TrainProgress(_iteration, TotalIterations, loss, lr));

                if (_iteration % Config.LogInterval == 0 || _iteration == TotalIterations)
                {
                    double eta = runClock.Elapsed.TotalSeconds / (_iteration - start) * (TotalIterations - _iteration);
                    double tokensPerSecond = window.Tokens / Math.Max(window.Time, 1e-9);
                    // Tokens and tiles are the whole job's; MFU is per device.
                    double? mfu = peak is { } p ? (6.0 * _llmParams * window.Tokens + (VisionTrainable ? 6.0 : 2.0) * _vitParams * 1025 * window.Tiles) / (window.Time * p * 1e12 * WorldSize) : null;
                    log.Iteration(new IterationStats(_iteration, TotalIterations, lr, eta, window.Time / window.Count, window.DataTime / window.Count,
                        MemoryMb(gpuMemory), window.MeanLoss, lastGradNorm, tokensPerSecond, mfu, _optimizerSteps));
                    log.Info($"dynamic ViT batch size: {batch.Tiles}, images per sample: {(batch.SampleIds.Length == 0 ? 0 : (double)batch.Tiles / batch.SampleIds.Length):0.##}, dynamic token length: {batch.InputIds.shape[1]}{(batch.Packing is { } rows ? $", packed rows: {rows.Rows}" : "")}");
                    if (_visionCache is { } vc)
                    {
                        log.Info($"vision cache: {ImageSamplesFromCache - windowStart.FromCache} of {ImageSamples - windowStart.Images} samples with images served from the cache{(WorldSize > 1 ? " on rank 0" : "")}; " +
                                 $"{vc.Stored} entries stored this run; {vc.EntriesAtOpen + vc.Stored} entries, {(vc.BytesAtOpen + vc.StoredBytes) / 1048576.0:F1} MiB");
                        windowStart = (ImageSamples, ImageSamplesFromCache);
                    }
                    window = new Window();
                    gpuMemory?.Reset();
                }
                if (stepNow && Config.SaveSteps > 0 && _iteration % Config.SaveSteps == 0 && _iteration < TotalIterations)
                    SaveCheckpoint();
            }
        }
        catch (Exception e) when (_dp is not null && e is not DistributedException)
        {
            // This rank cannot go on: end the job on every rank now rather than after their timeout.
            _dp.Abort($"{e.GetType().Name}: {e.Message}");
            throw;
        }
        finally { BackwardScratch.Release(); }
        _visionCache?.Flush();   // its counts (and entries a next run needs) complete before the summary and the checkpoint

        if (interrupted)
        {
            // Gradients of an unfinished accumulation cycle are dropped: the checkpoint is at the last optimizer step,
            // and resuming replays that cycle from its first micro-batch.
            ClearGradients();
            _masters!.ZeroModelGradients();
            _iteration = _iteration / accum * accum;
            log.Warning($"interrupted; saving a checkpoint at iteration {_iteration}");
            // Nothing to save before the first step, or when this session's last checkpoint is already at that step.
            if (_iteration > 0 && _lastCheckpoint != Path.Combine(WorkDir, $"iter_{_iteration}")) SaveCheckpoint();
        }
        else
        {
            // A resume of a finished run has nothing new to save; any run that trained writes its final state.
            if (_iteration > start || _lastCheckpoint is null) SaveCheckpoint();
            log.Info($"training finished: {_iteration} iterations, {_optimizerSteps} optimizer steps; skipped: {Counters}");
            if (_visionCache is { } vc)
                log.Info($"vision cache: {ImageSamplesFromCache} of {ImageSamples} samples with images came from the cache this run{(WorldSize > 1 ? " on rank 0" : "")}, " +
                         $"{vc.Stored} entries stored ({vc.StoredBytes / 1048576.0:F1} MiB); the cache holds about {(vc.BytesAtOpen + vc.StoredBytes) / 1048576.0:F1} MiB in {vc.Directory}");
        }
        return new TrainResult
        {
            WorkDir = WorkDir, RunDir = RunDir, Iterations = _iteration, OptimizerSteps = _optimizerSteps, Losses = losses,
            LastCheckpoint = _lastCheckpoint, Counters = Counters, Interrupted = interrupted,
        };
    }

    /// <summary>
    /// The log's memory column (MiB): on CUDA the peak since the last log line, of live tensor bytes under the
    /// cudaMallocAsync allocator backend (mmengine's max_memory_allocated) and of device memory otherwise (see
    /// <see cref="VlmTune.Diagnostics.GpuMemoryMonitor"/>); on CPU the process's peak working set.
    /// </summary>
    private static long MemoryMb(VlmTune.Diagnostics.GpuMemoryMonitor? gpu) =>
        (gpu?.PeakBytes ?? Process.GetCurrentProcess().PeakWorkingSet64) / (1024 * 1024);

    private sealed class Window
    {
        public int Count; public double Time, DataTime, LossSum; public int LossCount; public long Tokens, Tiles;

        public void Add(double time, double dataTime, double loss, long tokens, long tiles)
        {
            Count++; Time += time; DataTime += dataTime; Tokens += tokens; Tiles += tiles;
            if (double.IsFinite(loss)) { LossSum += loss; LossCount++; }
        }

        public double MeanLoss => LossCount == 0 ? double.NaN : LossSum / LossCount;
    }

    /// <summary>
    /// One micro-batch: loss (fp32, chunked) and its backward pass scaled for accumulation. Returns the loss and the
    /// batch's tokens and tiles — over all ranks when data-parallel: ranks first agree on the supervised-token count,
    /// and each weighs its loss by its share of it, so the summed gradients are the token mean over the global batch
    /// (what one process with the whole batch computes). The same agreement carries NaN verdicts and stop requests,
    /// so every rank takes the same branch.
    /// </summary>
    private (double Loss, long Tokens, long Tiles) ForwardBackward(TrainBatch batch, int imageContextId, long cycleSize, long it, bool stepNow, CancellationToken cancel)
    {
        var model = Model;
        using var scope = NewDisposeScope();
        Tensor? loss = null;
        long localTokens = 0;
        double value = double.NaN;
        long towerTiles = 0;
        if (!batch.IsEmpty)
        {
            var ids = batch.InputIds.to(_device);
            var labels = batch.Labels.to(_device);
            var features = ImageEmbeddings(batch, out towerTiles);
            VlmTune.Diagnostics.MemoryTrace.Mark("vision + projector");
            var embeds = model.EmbedWithImages(ids, features, imageContextId);
            VlmTune.Diagnostics.MemoryTrace.Mark("embeddings");
            var hidden = model.language_model.Forward(embeds, new DecoderInputs { Packing = batch.Packing });
            VlmTune.Diagnostics.MemoryTrace.Mark("decoder forward");
            (loss, localTokens) = CausalLmLoss.Compute(hidden, labels, model.language_model.OutputHead, Config.LossChunkSize);
            VlmTune.Diagnostics.MemoryTrace.Mark("loss");
            if (localTokens > 0) value = loss.item<float>();
        }
        bool localBad = localTokens > 0 && !double.IsFinite(value);
        double tokens = localTokens, lossSum = localTokens > 0 && !localBad ? value * localTokens : 0, bad = localBad ? 1 : 0;
        long batchTokens = batch.Tokens, tiles = towerTiles;   // MFU counts the ViT's work: cached tiles skip it
        if (_dp is not null)
        {
            var sums = _dp.SumOverRanks(tokens, lossSum, bad, cancel.IsCancellationRequested ? 1 : 0, batchTokens, tiles);
            (tokens, lossSum, bad) = (sums[0], sums[1], sums[2]);
            _stopAgreed |= sums[3] > 0;
            (batchTokens, tiles) = ((long)sums[4], (long)sums[5]);
        }
        _dp?.BeginBackward(reduce: stepNow);
        if (tokens == 0)
        {
            if (!batch.IsEmpty || _dp is not null)
                _log!.Warning($"iteration {it + 1}: {(batch.IsEmpty ? "no usable sample" : $"samples {string.Join(", ", batch.SampleIds)} have no supervised token")}{(_dp is null ? "" : " on any rank")}; nothing to learn");
            return (double.NaN, batchTokens, tiles);
        }
        if (bad > 0)
        {
            string where = localBad ? $"the loss is {value} on samples {string.Join(", ", batch.SampleIds)}" : "the loss is not finite on another rank";
            string what = $"iteration {it + 1} (optimizer step {_optimizerSteps + 1}): {where}";
            if (Config.NanPolicy == NanPolicy.Stop)
                throw new TrainingDivergedException($"{what}; stopping (set nan_policy: skip to skip such micro-batches).");
            Counters.AddNanSkipped();
            _log!.Warning($"{what}; micro-batch skipped ({Counters.NanSkipped} so far)");
            return (double.NaN, batchTokens, tiles);
        }
        if (localTokens > 0)
        {
            var scaled = _dp is null ? loss! / cycleSize : loss! * (localTokens / tokens / cycleSize);
            scaled.backward();
            VlmTune.Diagnostics.MemoryTrace.Mark("backward done");
        }
        BackwardScratch.Release();
        return (lossSum / tokens, batchTokens, tiles);
    }

    /// <summary>
    /// The batch's image embeddings (tiles, 256, D) in prompt order. With the vision cache the ViT runs only on the
    /// tiles of samples whose features are not cached (and stores them for next time); the projector runs on all.
    /// </summary>
    /// <param name="towerTiles">Tiles the ViT ran on.</param>
    private Tensor? ImageEmbeddings(TrainBatch batch, out long towerTiles)
    {
        var model = Model;
        towerTiles = 0;
        ImageSamples += batch.Vision.Count;
        if (_visionCache is null)
        {
            if (batch.Pixels is null) return null;
            towerTiles = batch.Pixels.shape[0];
            VisionTowerTiles += towerTiles;
            return model.ExtractFeatures(batch.Pixels.to(_device).to_type(_dtype), visionGrad: VisionTrainable, projectorGrad: !Config.FreezeProjector);
        }
        if (batch.Vision.Count == 0) return null;

        // Loader workers encode batches ahead, so a sample may have been encoded before an earlier batch stored its
        // features: take them now rather than run the ViT again (it runs once per distinct image list).
        var late = new Tensor?[batch.Vision.Count];
        var towerRows = new List<long>();
        long pixelRow = 0;
        for (int i = 0; i < batch.Vision.Count; i++)
        {
            var source = batch.Vision[i];
            if (source.Cached) continue;
            late[i] = source.StoreAs is { } entry ? _visionCache.TryLoadStored(entry) : null;
            if (late[i] is null) for (int t = 0; t < source.Tiles; t++) towerRows.Add(pixelRow + t);
            pixelRow += source.Tiles;
        }
        Tensor? computed = null;
        if (towerRows.Count > 0)
        {
            var pixels = towerRows.Count == pixelRow ? batch.Pixels! : batch.Pixels!.index_select(0, tensor(towerRows.ToArray()));
            computed = model.VisionFeatures(pixels.to(_device).to_type(_dtype), grad: false);   // (tiles, 256, 4C)
            towerTiles = towerRows.Count;
            VisionTowerTiles += towerTiles;
        }
        var cached = batch.CachedFeatures?.to(_device);
        var parts = new List<Tensor>();
        long fromCache = 0, fromTower = 0;
        for (int i = 0; i < batch.Vision.Count; i++)
        {
            var source = batch.Vision[i];
            if (source.Cached)
            {
                parts.Add(cached!.narrow(0, fromCache, source.Tiles));
                fromCache += source.Tiles;
                ImageSamplesFromCache++;
            }
            else if (late[i] is { } stored)
            {
                parts.Add(stored.to(_device));
                ImageSamplesFromCache++;
            }
            else
            {
                var part = computed!.narrow(0, fromTower, source.Tiles);
                fromTower += source.Tiles;
                if (source.StoreAs is { } entry) _visionCache.Store(entry, part);
                parts.Add(part);
            }
        }
        return model.Project(parts.Count == 1 ? parts[0] : cat(parts, 0), grad: !Config.FreezeProjector);
    }

    /// <summary>Clips, checks and applies the accumulated gradients; returns the gradient norm before clipping.</summary>
    private double? OptimizerStep(long it, List<string> samples)
    {
        _dp?.FinishGradients();   // every rank now holds the global batch's gradient
        _masters!.GradientsToMasters();
        // Every trainable tensor takes part in every step, with a zero gradient where the cycle gave it none (the
        // projector after text-only batches), as under data parallelism and DeepSpeed. AdamW skips a tensor without a
        // gradient but moves one with a zero gradient (momentum, weight decay): the step must not depend on whether a
        // gradient tensor happens to exist, which a resumed run's do not until their first use.
        _masters.FillMissingGradients();
        // The norm covers every trainable tensor; under ZeRO-1 the ones another rank updates count through their
        // (identical, reduced) model gradients.
        var withGrad = _masters.OptimizerParameters
            .Concat(_zero is null ? [] : _trainable.Where(t => _zero.Owner[t.Name] != Rank).Select(t => t.Param))
            .Where(p => p.grad is not null).ToList();
        double norm = nn.utils.clip_grad_norm_(withGrad, Config.MaxNorm);
        if (!double.IsFinite(norm))
        {
            string what = $"iteration {it + 1} (optimizer step {_optimizerSteps + 1}): the gradient norm is {norm} after samples {string.Join(", ", samples)}";
            if (Config.NanPolicy == NanPolicy.Stop)
                throw new TrainingDivergedException($"{what}; stopping (set nan_policy: skip to skip such steps).");
            Counters.AddNanSkipped();
            _log!.Warning($"{what}; optimizer step skipped ({Counters.NanSkipped} so far)");
            ClearGradients();
            return norm;
        }
        _optimizer!.step();
        ClearGradients();
        _masters.MastersToModel();
        // ZeRO-1: each tensor's owner updated it; everyone takes the owner's new value.
        if (_zero is not null) _dp!.BroadcastFromOwners(_trainable.Select(t => ((Tensor)t.Param, _zero.Owner[t.Name])).ToList());
        _optimizerSteps++;
        return norm;
    }

    private void ClearGradients()
    {
        _optimizer!.zero_grad();
        if (_zero is null) return;
        using var noGrad = no_grad();
        foreach (var (name, p) in _trainable)
            if (_zero.Owner[name] != Rank) p.grad?.zero_();
    }

    /// <summary>
    /// Writes <c>iter_&lt;n&gt;/</c> in the work dir: the LoRA adapter(s) in PEFT format, the other trained weights
    /// (projector, ...) as safetensors, the optimizer state and the trainer state. Written to a temporary sibling and
    /// renamed last, so an interrupted write is never taken for a checkpoint; then older ones beyond save_total_limit go.
    /// </summary>
    public string SaveCheckpoint()
    {
        // Data-parallel: every rank calls this at the same iteration. Rank 0 writes the folder; under ZeRO-1 each rank
        // adds its optimizer shard (a shared filesystem across nodes, as DeepSpeed needs); the rename happens only
        // once every part is in, so an interrupted save never leaves a checkpoint that looks complete.
        _dp?.Heartbeat();
        var model = Model;
        string final = Path.Combine(WorkDir, $"iter_{_iteration}");
        string temp = IO.OwnedTemporary.Name(Path.Combine(WorkDir, $".iter_{_iteration}{CheckpointFiles.TempMarker}"));
        if (_dp is not null) temp = _dp.Broadcast(temp);
        if (IsMaster) Directory.CreateDirectory(temp);
        _dp?.Barrier();
        var gathered = new List<Tensor>();
        try
        {
            // Everything from the fp32 masters (a master is the parameter itself where that is fp32), so the adapters of an
            // offloaded optimizer and the trained non-LoRA weights resume exactly.
            var masters = _masters!.Pairs.ToDictionary(p => p.Name, p => (Tensor)p.Master);
            if (IsMaster && _llmLora is not null) PeftAdapter.Save(model.language_model, temp, _llmLora, n => masters.GetValueOrDefault("language_model." + n));
            if (IsMaster && _visionLora is not null) PeftAdapter.Save(model.vision_model, Path.Combine(temp, VisionAdapterDir), _visionLora, n => masters.GetValueOrDefault("vision_model." + n));
            var full = TrainedMasters(masters, gathered);
            if (IsMaster && full.Count > 0) TrainedWeights.Save(temp, full);
            if (_zero is not null) _optimizer!.save_state_dict(Path.Combine(temp, OptimizerShardFile(Rank)));
            else if (IsMaster) _optimizer!.save_state_dict(Path.Combine(temp, OptimizerFile));
            _dp?.Barrier();
            VlmTune.Diagnostics.TestPause.At("checkpoint", CancellationToken.None);
            if (IsMaster) CommitCheckpoint(temp, final);
        }
        catch (Exception e)
        {
            if (IsMaster) try { Directory.Delete(temp, recursive: true); } catch (IOException) { }
            if (IO.DiskFull.Is(e)) throw IO.DiskFull.Error($"checkpoint iter_{_iteration}", WorkDir, "no checkpoint was saved (the earlier ones are intact)", e);
            throw;
        }
        finally { foreach (var t in gathered) t.Dispose(); }
        _dp?.Barrier();
        _dp?.Heartbeat();
        _lastCheckpoint = final;
        if (IsMaster)
        {
            AtomicFile.WriteAllText(Path.Combine(WorkDir, LastCheckpointFile), final);
            _log?.Info($"saved checkpoint {final}");
            Prune();
        }
        return final;
    }

    public static string OptimizerShardFile(int rank) => $"optimizer.rank{rank}.bin";

    /// <summary>
    /// Name → fp32 value of every trained non-LoRA tensor. Under ZeRO-1 a master lives on its owner only, so each is
    /// broadcast from there (every rank takes part; the temporaries go into <paramref name="temporaries"/>).
    /// </summary>
    private List<KeyValuePair<string, Tensor>> TrainedMasters(IReadOnlyDictionary<string, Tensor> masters, List<Tensor> temporaries)
    {
        var result = new List<KeyValuePair<string, Tensor>>();
        var transfers = new List<(Tensor, int)>();
        foreach (var (name, param) in _trainable.Where(t => !t.Name.Contains(".lora_")))
        {
            if (masters.TryGetValue(name, out var master) && _zero is null) { result.Add(new(name, master)); continue; }
            int owner = _zero!.Owner[name];
            var value = owner == Rank ? masters[name] : empty(param.shape, ScalarType.Float32, param.device).DetachFromDisposeScope();
            if (owner != Rank) temporaries.Add(value);
            transfers.Add((value, owner));
            result.Add(new(name, value));
        }
        if (transfers.Count > 0) _dp!.BroadcastFromOwners(transfers);
        return result;
    }

    private void CommitCheckpoint(string temp, string final)
    {
        var state = new JsonObject
        {
            ["iteration"] = _iteration,
            ["optimizer_steps"] = _optimizerSteps,
            ["total_iterations"] = TotalIterations,
            ["samples"] = Dataset.Samples.Count,
            ["mode"] = Config.Mode.ToString().ToLowerInvariant(),
            ["lora_r"] = Config.LoraR,
            ["batch_size"] = Config.BatchSize,
            ["accumulative_counts"] = Config.AccumulativeCounts,
            ["seed"] = Config.Seed,
            ["world_size"] = WorldSize,
            ["zero_stage"] = _zero is null ? 0 : 1,
            ["trainable"] = new JsonArray(_trainable.Select(t => (JsonNode?)JsonValue.Create(t.Name)).ToArray()),
            ["counters"] = new JsonObject
            {
                ["bad_records"] = Counters.BadRecords, ["broken_images"] = Counters.BrokenImages, ["too_long"] = Counters.TooLong,
                ["label_mismatch"] = Counters.LabelMismatch, ["nan_skipped"] = Counters.NanSkipped,
            },
            ["config"] = Config.Resolved().ToYaml(),
        };
        // The state file is written last: its presence marks the folder complete.
        AtomicFile.WriteAllText(Path.Combine(temp, StateFile), state.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        // Replacing a checkpoint of the same iteration (a rerun in the same work dir): move the old one aside first,
        // so one complete copy exists at every moment.
        string? old = null;
        if (Directory.Exists(final))
        {
            old = IO.OwnedTemporary.Name(Path.Combine(WorkDir, $".iter_{_iteration}{CheckpointFiles.OldMarker}"));
            Directory.Move(final, old);
        }
        Directory.Move(temp, final);
        if (old is not null) Directory.Delete(old, recursive: true);
    }

    private void Prune()
    {
        if (Config.SaveTotalLimit <= 0) return;
        var all = Checkpoints(WorkDir);
        foreach (var (_, dir) in all.Take(Math.Max(0, all.Count - Config.SaveTotalLimit)))
        {
            Directory.Delete(dir, recursive: true);
            _log?.Info($"removed old checkpoint {dir} (save_total_limit {Config.SaveTotalLimit})");
        }
    }

    private void Resume(string dir)
    {
        string statePath = Path.Combine(dir, StateFile);
        var state = CheckpointFiles.ReadState(statePath);
        var problems = new List<string>();
        void Same<T>(string key, T expected) where T : notnull
        {
            var stored = state[key] is JsonValue v && v.TryGetValue<T>(out var x) ? x : default;
            if (stored is null || !stored.Equals(expected)) problems.Add($"'{key}' is {expected} but the checkpoint was trained with {state[key]?.ToJsonString() ?? "nothing"}");
        }
        Same("mode", Config.Mode.ToString().ToLowerInvariant());
        Same("lora_r", Config.LoraR);
        Same("batch_size", Config.BatchSize);
        Same("accumulative_counts", Config.AccumulativeCounts);
        Same("seed", Config.Seed);
        Same("samples", Dataset.Samples.Count);
        // Older checkpoints predate data parallelism: one process, no ZeRO.
        long storedWorld = CheckpointFiles.Integer(state, "world_size", statePath, fallback: 1), storedZero = CheckpointFiles.Integer(state, "zero_stage", statePath, fallback: 0);
        int zeroStage = _zero is null ? 0 : 1;
        if (storedWorld != WorldSize)
            problems.Add($"it was trained by {storedWorld} process(es) and this run has {WorldSize}: the global batch (batch_size × processes) would change; resume with --nproc-per-node {storedWorld}");
        if (storedZero != zeroStage) problems.Add($"'zero_stage' is {zeroStage} but the checkpoint was written with zero_stage {storedZero}");
        var names = CheckpointFiles.Strings(state, "trainable", statePath);
        if (!names.SequenceEqual(_trainable.Select(t => t.Name)))
            problems.Add("the trained parameters differ from the checkpoint's (freeze_* or lora_targets changed)");
        if (problems.Count > 0)
            throw new ConfigException(Config.Source, problems.Select(p => $"--resume {dir}: {p}").ToList());

        var model = Model;
        static Func<string, string?> InAdapter(string part) => n => n.StartsWith(part, StringComparison.Ordinal) ? PeftAdapter.TensorName(n[part.Length..]) : null;
        if (_llmLora is not null)
            using (var file = SafetensorsFile.Open(Path.Combine(dir, PeftAdapter.WeightsFile)))
            {
                AdapterCheckpoint.RequireFinite(file);
                PeftAdapter.LoadWeights(model.language_model, file);
                _masters!.Load(file, InAdapter("language_model."));   // exact fp32 masters where the model rounds
            }
        if (_visionLora is not null)
            using (var file = SafetensorsFile.Open(Path.Combine(dir, VisionAdapterDir, PeftAdapter.WeightsFile)))
            {
                AdapterCheckpoint.RequireFinite(file);
                PeftAdapter.LoadWeights(model.vision_model, file);
                _masters!.Load(file, InAdapter("vision_model."));
            }
        if (_trainable.Any(t => !t.Name.Contains(".lora_")))
        {
            if (File.Exists(Path.Combine(dir, TrainableFile)))
                using (var trained = SafetensorsFile.Open(Path.Combine(dir, TrainableFile))) AdapterCheckpoint.RequireFinite(trained);
            if (TrainedWeights.LoadIfPresent(model, dir) == 0)
                throw new VlmTuneException($"--resume: {dir} has no {TrainableFile} but this run trains non-LoRA weights.");
            using var file = SafetensorsFile.Open(Path.Combine(dir, TrainableFile));
            _masters!.Load(file);
        }
        string optimizerFile = Path.Combine(dir, _zero is null ? OptimizerFile : OptimizerShardFile(Rank));
        if (!File.Exists(optimizerFile)) throw new VlmTuneException($"--resume: {dir} has no {Path.GetFileName(optimizerFile)} (an incomplete checkpoint?)");
        var c = CheckpointFiles.Object(state, "counters", statePath);
        long Counter(string key) => CheckpointFiles.Integer(c, key, $"{statePath} (counters)");
        var counters = (Counter("bad_records"), Counter("broken_images"), Counter("too_long"), Counter("label_mismatch"), Counter("nan_skipped"));
        long iteration = CheckpointFiles.Integer(state, "iteration", statePath), steps = CheckpointFiles.Integer(state, "optimizer_steps", statePath);
        if (iteration < 0 || steps < 0 || steps > iteration)
            throw new VlmTuneException($"--resume: {statePath}: iteration {iteration} with optimizer_steps {steps} is impossible; the checkpoint is damaged.");
        CheckpointFiles.LoadOptimizer(_optimizer!, optimizerFile);
        _iteration = iteration;
        _optimizerSteps = steps;
        Counters.Restore(counters.Item1, counters.Item2, counters.Item3, counters.Item4, counters.Item5);
        _lastCheckpoint = dir;
        _log!.Info($"resumed from {dir} at iteration {_iteration} (optimizer step {_optimizerSteps})");
    }

    public void Dispose()
    {
        _log?.Dispose();
        _optimizer?.Dispose();
        _masters?.Dispose();
        _visionCache?.Dispose();
        _model?.Dispose();
        _dp?.Dispose();
    }
}

/// <summary>
/// Test aid for the failure handling of data-parallel jobs: VLMTUNE_TEST_FAULT=exit|hang:RANK:ITERATION makes that rank
/// die (exit code 7, no cleanup, as a crash would) or stop responding when it reaches that iteration.
/// </summary>
internal static class InjectedFault
{
    private static readonly (string Kind, int Rank, long Iteration)? Fault = Parse(Environment.GetEnvironmentVariable("VLMTUNE_TEST_FAULT"));

    private static (string, int, long)? Parse(string? raw)
    {
        var parts = raw?.Split(':');
        return parts is [var kind and ("exit" or "hang"), var r, var i] && int.TryParse(r, out var rank) && long.TryParse(i, out var it)
            ? (kind, rank, it) : null;
    }

    public static void At(int rank, long iteration)
    {
        if (Fault is not { } f || f.Rank != rank || f.Iteration != iteration) return;
        Console.Error.WriteLine($"VLMTUNE_TEST_FAULT: rank {rank} {(f.Kind == "exit" ? "dies" : "hangs")} at iteration {iteration}");
        Console.Error.Flush();
        if (f.Kind == "exit") VlmTune.Diagnostics.ProcessExit.Now(7);
        Thread.Sleep(Timeout.Infinite);
    }
}
