using System.Diagnostics;
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
using VlmTune.Data;

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
    /// <summary>The entry point's environment switches: NF4 kernel, GPU isolation, memory trace, test fault and pause.</summary>
    public RuntimeSwitches Switches { get; init; } = RuntimeSwitches.Defaults;
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
    /// <summary>The evaluations of this session (eval_data), in order.</summary>
    public IReadOnlyList<EvalResult> Evaluations { get; init; } = [];
}

/// <summary>A non-finite loss or gradient norm stopped the run (nan_policy: stop).</summary>
public sealed class TrainingDivergedException(string message) : VlmTuneException(message);

/// <summary>
/// The fine-tuning recipe (full, LoRA, QLoRA) of InternVL, as XTuner runs it: <see cref="Setup"/> validates everything,
/// loads the model, applies the mode (<see cref="ModelPreparation"/>) and builds the data index; <see cref="Train"/>
/// runs iterations of forward/backward (<see cref="MicroBatchStep"/>) with gradient accumulation, AdamW with clipping
/// (<see cref="TrainingOptimizer"/>), the warm-up + cosine schedule per iteration, logging (<see cref="StepStatistics"/>)
/// and checkpoints (<see cref="TrainingCheckpointer"/>). See docs/training.md.
/// </summary>
public sealed class Trainer(TrainConfig config, TrainerOptions? options = null) : IDisposable
{
    private readonly TrainerOptions _options = options ?? new TrainerOptions();
    private InternVLChatModel? _model;
    private TextTokenizer? _tokenizer;
    private SampleEncoder? _encoder;
    private VisionFeatureCache? _visionCache;
    private TrainDataset? _dataset;
    private BatchPlan? _plan;
    private PreparedModel? _prepared;
    private TrainingFlops? _flops;
    private ImageFeatureSupply? _images;
    private TrainingOptimizer? _optimizer;
    private TrainingCheckpointer? _checkpointer;
    private MicroBatchStep? _step;
    private TrainingEvaluator? _evaluator;
    private ConversationTokenizer? _conversations;
    private ImageProcessorOptions? _tiling;
    private double? _bestEvalLoss;
    private readonly List<EvalResult> _evaluations = [];
    private LrSchedule? _schedule;
    private TrainLog? _log;
    private DropoutSeeds? _seeds;
    private Device _device = CPU;
    private ScalarType _dtype = ScalarType.Float32;
    private long _iteration;
    private DistributedEnvironment _env = DistributedEnvironment.Single;
    private DataParallel? _dp;

    public TrainConfig Config { get; } = config;
    public DataCounters Counters { get; } = new();
    public InternVLChatModel Model => _model ?? throw new InvalidOperationException("call Setup() first.");
    public TrainDataset Dataset => _dataset ?? throw new InvalidOperationException("call Setup() first.");
    public SampleEncoder Encoder => _encoder ?? throw new InvalidOperationException("call Setup() first.");
    /// <summary>The vision feature cache (cache_vision_features), or null.</summary>
    public VisionFeatureCache? VisionCache => _visionCache;
    /// <summary>Image tiles this process ran through the vision tower (cached ones skip it).</summary>
    public long VisionTowerTiles => _images?.TowerTiles ?? 0;
    /// <summary>Samples with images this process trained on, and those of them whose features came from the vision cache.</summary>
    public long ImageSamples => _images?.ImageSamples ?? 0;
    public long ImageSamplesFromCache => _images?.ImageSamplesFromCache ?? 0;
    public long TotalIterations { get; private set; }
    public long Iteration => _iteration;
    public string WorkDir => Path.GetFullPath(Config.ResolvedWorkDir);
    public string RunDir => _log?.RunDir ?? "";
    public int Rank => _env.Rank;
    public int WorldSize => _env.WorldSize;
    private bool IsMaster => _env.IsMaster;
    private TrainingOptimizer Optimizer => _optimizer ?? throw new InvalidOperationException("call Setup() first.");

    public void Setup()
    {
        _env = _options.Distributed ?? DistributedEnvironment.FromProcess();
        // Each rank sees only its own GPU, before anything initialises CUDA (CheckInputs asks whether CUDA is there).
        if (_env.IsDistributed && Config.Device.StartsWith("cuda", StringComparison.Ordinal)) DataParallel.BindLocalGpu(_env, _options.Switches.GpuIsolated);
        var resumeDir = CheckInputs();
        _device = TensorPlacement.ParseDevice(Config.Device, "'device':");   // checked above; CUDA's presence too
        _dtype = TensorPlacement.TryParseDType(Config.Dtype, out var dtype) ? dtype : ModelOptions.DefaultDType(_device);   // "auto"
        manual_seed(Config.Seed);

        Directory.CreateDirectory(WorkDir);
        _log = IsMaster ? new TrainLog(WorkDir, Config.Resolved().ToYaml(), tensorBoard: Config.ReportsToTensorBoard) { Echo = _options.Echo } : TrainLog.ForOtherRank(Rank, _options.Echo);
        if (IsMaster) CheckpointFiles.RemoveStaleTemporaries(WorkDir, _log.Info);
        _log.Info($"vlmtune train: {Config.Source} (mode {Config.Mode.ToString().ToLowerInvariant()}, device {Config.Device}, {TensorPlacement.ShortName(_dtype)}); run folder {_log.RunDir}");
        if (_env.IsDistributed)
        {
            _dp = DataParallel.Start(_env, _device, TimeSpan.FromSeconds(Config.DistTimeoutS));
            _log.Info($"data parallel: {WorldSize} ranks ({_env.Source}, {_env.NodeCount} node(s)), {_dp.Backend}, " +
                      $"ZeRO stage {Config.ZeroStage}; global batch {Config.BatchSize} × {WorldSize} ranks × accumulation {Config.AccumulativeCounts}");
        }
        try
        {
            _conversations = SetupModel();
            SetupData(_conversations);
            SetupTraining(resumeDir);
        }
        catch (Exception e) when (_dp is not null && e is not DistributedException)
        {
            _dp.Abort($"setup failed: {e.Message}");
            throw;
        }
    }

    /// <summary>Loads the model and its tokenizer; returns the conversation tokenizer the data is encoded with.</summary>
    private ConversationTokenizer SetupModel()
    {
        _model = InternVLModelLoader.Load(Config.Model, new ModelOptions { Device = _device, DType = _dtype });
        _tokenizer = TextTokenizer.Load(Config.Model);
        var template = ConversationTemplate.Get(Config.Template ?? _model.Config.Template);
        if ((Config.SystemMessage ?? _model.Config.SystemMessage) is { } system) template = template with { SystemMessage = system };
        return new ConversationTokenizer(_tokenizer, template, _model.Config.NumImageToken, Config.MaxLength);
    }

    /// <summary>The encoder, the vision feature cache, the dataset index and the batch plan.</summary>
    private void SetupData(ConversationTokenizer tokenizer)
    {
        var log = _log!;
        var model = Model;
        var modelTiling = VlmTune.Data.ModelTiling.ImageOptions(model.Config);
        var images = modelTiling with
        {
            MinTiles = Config.MinDynamicPatch ?? modelTiling.MinTiles, MaxTiles = Config.MaxDynamicPatch ?? modelTiling.MaxTiles,
            UseThumbnail = Config.UseThumbnail ?? modelTiling.UseThumbnail,
        };
        log.Info($"template {tokenizer.Template.Name}; tiles per image {images.MinTiles}–{images.MaxTiles}{(images.UseThumbnail ? " + thumbnail" : "")} ({(Config.MaxDynamicPatch is null ? "the model's config.json" : "the training config")})");
        if (Config.CacheVisionFeatures)
        {
            _visionCache = VisionFeatureCache.Open(Config.ResolvedVisionCacheDir, Config.Model, model.Config, _dtype, Config.QuantizeVision, m => log.Warning(m));
            log.Info($"vision feature cache: {_visionCache.Directory} ({_visionCache.EntriesAtOpen} entries, {_visionCache.BytesAtOpen / 1048576.0:F1} MiB); " +
                     $"the frozen ViT's features of each sample's images are stored on first use and reused (model fingerprint {_visionCache.ModelFingerprint[..12]})");
        }
        _tiling = images;
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
    }

    /// <summary>The training mode, activation checkpointing, the optimizer, the step and the checkpointer; then the resume.</summary>
    private void SetupTraining(string? resumeDir)
    {
        var log = _log!;
        var model = Model;
        _flops = TrainingFlops.Of(model, Config.TrainsVision);   // before NF4 packs the weights
        _prepared = ModelPreparation.Apply(model, Config, _dtype, log.Info, _options.Switches.Nf4Kernel);
        _schedule = new LrSchedule(Config.Lr, TotalIterations, Config.WarmupRatio);
        // Ranks draw different dropout masks (as they would on different samples); rank 0's are the single-process ones.
        _seeds = new DropoutSeeds(Config.Seed + Rank * 1_000_003L);
        ActivationCheckpointing.Apply(model.language_model, Config.GradientCheckpointing, _seeds, _dp is null ? null : _dp.LayerGradientsReady, Config.ActivationOffload);
        if (_dp is not null)
        {
            // Initial trainable weights (LoRA's random A, ...) are rank 0's everywhere.
            _dp.BroadcastFromOwners(_prepared.Trainable.Select(t => ((Tensor)t.Param, 0)).ToList());
            _dp.Prepare([.. _prepared.Trainable]);
            string overlap = _dp.Backend != "nccl" ? "summed after the backward pass (CPU tensors)"
                : Config.GradientCheckpointing ? "each all-reduced during the backward pass as soon as its layer is done"
                : "all-reduced after the backward pass (overlap needs gradient_checkpointing)";
            log.Info($"gradients reduced in {_dp.BucketCount} buckets (one per decoder layer, one for the rest), {overlap}");
        }
        _optimizer = new TrainingOptimizer(Config, _prepared.Trainable, _dp, Rank, log.Info, _options.Switches.FusedAdamW);
        _images = new ImageFeatureSupply(model, _visionCache, _device, _dtype, _prepared.VisionTrainable, _prepared.ProjectorTrainable);
        _step = new MicroBatchStep(model, _images, Config, _device, _tokenizer!.ImgContextId, Counters, _dp, log.Warning);
        _checkpointer = new TrainingCheckpointer(Config, WorkDir, model, _prepared, _optimizer, _dp, log, _options.Switches.TestPause);
        if (Config.Evaluates)
        {
            _evaluator = new TrainingEvaluator(Config, model, _prepared, _tokenizer!, _conversations!, _tiling!, _device, _dtype, _dp, log.Warning);
            _bestEvalLoss = Config.SaveBest ? TrainingCheckpointer.BestEvalLoss(WorkDir) : null;
            long every = Config.ResolvedEvalSteps;
            log.Info($"evaluation: {_evaluator.SampleCount} samples of {string.Join(", ", Config.EvalData)}{(every > 0 ? $" every {every} iterations and" : "")} at the end; " +
                     $"{Math.Min(Config.EvalGenerate, _evaluator.SampleCount)} answered greedily each time{(Config.SaveBest ? $"; the lowest eval loss is kept as {Path.Combine(WorkDir, IterCheckpoint.BestFolder)}{(_bestEvalLoss is { } b ? $" (so far {b:F4})" : "")}" : "")}");
        }
        if (resumeDir is not null) _iteration = _checkpointer.Resume(resumeDir, Dataset.Samples.Count, Counters).Iteration;
    }

    /// <summary>Checks paths and the device before any work; every problem at once. Returns the checkpoint to resume from.</summary>
    private string? CheckInputs()
    {
        var problems = new List<string>();
        if (!Directory.Exists(Config.Model)) problems.Add($"'model': folder not found: {Path.GetFullPath(Config.Model)}");
        else if (!File.Exists(Path.Combine(Config.Model, "config.json"))) problems.Add($"'model': {Path.GetFullPath(Config.Model)} has no config.json (not an InternVL2 model folder)");
        foreach (var file in Config.EvalData)
            if (!File.Exists(file)) problems.Add($"'eval_data': file not found: {Path.GetFullPath(file)}");
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
        try { resume = TrainingCheckpointer.FindResume(_options.Resume, WorkDir); }
        catch (VlmTuneException e) { problems.Add(e.Message); }
        if (problems.Count > 0) throw new ConfigException(Config.Source, problems);
        return resume;
    }

    /// <summary>Runs the remaining iterations. Cancellation (Ctrl-C) stops at the next iteration and saves a checkpoint.</summary>
    public TrainResult Train(CancellationToken cancel = default, Action<TrainProgress>? progress = null)
    {
        progress ??= _options.Progress;
        if (_model is null) Setup();
        var log = _log!;
        var step = _step!;
        var optimizer = Optimizer;
        int accum = Config.AccumulativeCounts;
        var losses = new List<double>();
        bool interrupted = false;
        bool cuda = _device.type == DeviceType.CUDA;
        using var gpuMemory = cuda ? new VlmTune.Diagnostics.GpuMemoryMonitor(_device.index < 0 ? 0 : _device.index) : null;
        var statistics = new StepStatistics(_flops!, Config.PeakTflops ?? (cuda ? 989.0 : null), WorldSize);
        long start = _iteration;
        var runClock = Stopwatch.StartNew();
        (long Images, long FromCache) cacheWindowStart = (0, 0);
        double? lastGradNorm = null;
        var cycleSamples = new List<string>();

        if (gpuMemory is { Available: true })
            log.Info($"memory column: {gpuMemory.SourceDescription}, MiB; {gpuMemory.CurrentBytes / (1024 * 1024)} MiB in use before the first step");
        log.Info($"training iterations {start + 1}..{TotalIterations} (batch {Config.BatchSize}{(WorldSize > 1 ? $" × {WorldSize} ranks" : "")} × accumulation {accum}, lr {Config.Lr:g}, warm-up {_schedule!.WarmupIterations} iterations)");
        using var loader = new BatchLoader(Dataset, _plan!, _encoder!, _tokenizer!.PadId, start, TotalIterations, Config.DataloaderNumWorkers,
            Config.PackToMaxLength ? Config.MaxLength : null, Config.PadMultiple(_device.type == DeviceType.CUDA));
        try
        {
            while (_iteration < TotalIterations)
            {
                _dp?.Heartbeat();
                _options.Switches.TestFault?.At(Rank, _iteration);
                // Ranks stop together, at the iteration after any of them was asked to (the request travels with the
                // per-iteration agreement), or the others would wait in a collective for it.
                if (_dp is null ? cancel.IsCancellationRequested : step.StopAgreed)
                {
                    interrupted = true;
                    break;
                }
                var clock = Stopwatch.StartNew();
                long it = _iteration;
                long cycleStart = it / accum * accum;
                long cycleSize = Math.Min(accum, TotalIterations - cycleStart);
                bool stepNow = it + 1 == cycleStart + cycleSize;
                double lr = _schedule.At(it);
                optimizer.SetLearningRate(lr);
                _seeds!.StartMicroBatch(it);
                VlmTune.Diagnostics.MemoryTrace.BeginIteration(it + 1, gpuMemory, _options.Switches.MemoryTraceIteration);
                manual_seed(_seeds.ForMicroBatch());   // dropout outside checkpointed layers: same masks after a resume

                using var batch = loader.Next();
                double dataTime = clock.Elapsed.TotalSeconds;
                if (batch.IsEmpty && _dp is null)
                    log.Warning($"iteration {it + 1}: every sample of the batch was skipped; nothing to learn");
                cycleSamples.AddRange(batch.SampleIds);
                var result = step.Run(batch, it, cycleSize, reduce: stepNow, optimizer.Steps, cancel.IsCancellationRequested);
                if (stepNow)
                {
                    lastGradNorm = optimizer.Step(it, cycleSamples, Counters, log.Warning);
                    VlmTune.Diagnostics.MemoryTrace.Mark("optimizer step");
                    cycleSamples.Clear();
                }
                _iteration++;
                losses.Add(result.Loss);
                statistics.Add(clock.Elapsed.TotalSeconds, dataTime, result.Loss, result.Tokens, result.Tiles);
                progress?.Invoke(new TrainProgress(_iteration, TotalIterations, result.Loss, lr));

                if (_iteration % Config.LogInterval == 0 || _iteration == TotalIterations)
                {
                    double eta = runClock.Elapsed.TotalSeconds / (_iteration - start) * (TotalIterations - _iteration);
                    log.Iteration(statistics.Close(_iteration, TotalIterations, lr, eta, StepStatistics.MemoryMb(gpuMemory), lastGradNorm, optimizer.Steps));
                    log.Info($"dynamic ViT batch size: {batch.Tiles}, images per sample: {(batch.SampleIds.Length == 0 ? 0 : (double)batch.Tiles / batch.SampleIds.Length):0.##}, dynamic token length: {batch.InputIds.shape[1]}{(batch.Packing is { } rows ? $", packed rows: {rows.Rows}" : "")}");
                    if (_visionCache is { } vc)
                    {
                        log.Info($"vision cache: {ImageSamplesFromCache - cacheWindowStart.FromCache} of {ImageSamples - cacheWindowStart.Images} samples with images served from the cache{(WorldSize > 1 ? " on rank 0" : "")}; " +
                                 $"{vc.Stored} entries stored this run; {vc.EntriesAtOpen + vc.Stored} entries, {(vc.BytesAtOpen + vc.StoredBytes) / 1048576.0:F1} MiB");
                        cacheWindowStart = (ImageSamples, ImageSamplesFromCache);
                    }
                    gpuMemory?.Reset();
                }
                EvalResult? eval = null;
                if (stepNow && _evaluator is not null && Config.ResolvedEvalSteps > 0 && _iteration % Config.ResolvedEvalSteps == 0 && _iteration < TotalIterations)
                    eval = Evaluate(cancel);
                if (stepNow && Config.SaveSteps > 0 && _iteration % Config.SaveSteps == 0 && _iteration < TotalIterations)
                    SaveCheckpoint(eval);
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
            optimizer.DropGradients();
            _iteration = _iteration / accum * accum;
            log.Warning($"interrupted; saving a checkpoint at iteration {_iteration}");
            // Nothing to save before the first step, or when this session's last checkpoint is already at that step.
            if (_iteration > 0 && _checkpointer!.Last != Path.Combine(WorkDir, IterCheckpoint.FolderName(_iteration))) SaveCheckpoint();
        }
        else
        {
            // A resume of a finished run has nothing new to save; any run that trained writes its final state, evaluated.
            if (_iteration > start || _checkpointer!.Last is null) SaveCheckpoint(_evaluator is null ? null : Evaluate(cancel));
            log.Info($"training finished: {_iteration} iterations, {optimizer.Steps} optimizer steps; skipped: {Counters}");
            if (_visionCache is { } vc)
                log.Info($"vision cache: {ImageSamplesFromCache} of {ImageSamples} samples with images came from the cache this run{(WorldSize > 1 ? " on rank 0" : "")}, " +
                         $"{vc.Stored} entries stored ({vc.StoredBytes / 1048576.0:F1} MiB); the cache holds about {(vc.BytesAtOpen + vc.StoredBytes) / 1048576.0:F1} MiB in {vc.Directory}");
        }
        return new TrainResult
        {
            WorkDir = WorkDir, RunDir = RunDir, Iterations = _iteration, OptimizerSteps = optimizer.Steps, Losses = losses,
            LastCheckpoint = _checkpointer!.Last, Counters = Counters, Interrupted = interrupted, Evaluations = [.. _evaluations],
        };
    }

    /// <summary>Evaluates on eval_data (every rank), logs it, and keeps the checkpoint of a new lowest eval loss (save_best).</summary>
    private EvalResult? Evaluate(CancellationToken cancel)
    {
        _dp?.Heartbeat();
        var result = _evaluator!.Run(_iteration, cancel);
        if (result is null)
        {
            _log!.Warning($"evaluation at iteration {_iteration} stopped by the interruption");
            return null;
        }
        _dp?.Barrier();   // rank 0's answers take a while; the others wait here rather than in the next collective
        _dp?.Heartbeat();
        _log!.Evaluation(result, TotalIterations);
        _evaluations.Add(result);
        if (Config.SaveBest && double.IsFinite(result.Loss) && !(result.Loss >= _bestEvalLoss))
        {
            _bestEvalLoss = result.Loss;
            _checkpointer!.Save(new TrainingPosition(_iteration, Optimizer.Steps), TotalIterations, Dataset.Samples.Count, Counters, result, asBest: true);
        }
        return result;
    }

    /// <summary>Writes <c>iter_&lt;n&gt;/</c> for the current iteration (see <see cref="TrainingCheckpointer.Save"/>).</summary>
    public string SaveCheckpoint() => SaveCheckpoint(null);

    private string SaveCheckpoint(EvalResult? eval)
    {
        if (_checkpointer is null) throw new InvalidOperationException("call Setup() first.");
        return _checkpointer.Save(new TrainingPosition(_iteration, Optimizer.Steps), TotalIterations, Dataset.Samples.Count, Counters, eval);
    }

    public void Dispose()
    {
        _log?.Dispose();
        _optimizer?.Dispose();
        _visionCache?.Dispose();
        _model?.Dispose();
        _dp?.Dispose();
    }
}
