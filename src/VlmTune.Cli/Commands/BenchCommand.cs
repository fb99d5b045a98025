using System.CommandLine;
using System.Diagnostics;
using System.Text.Json;
using TorchSharp;
using VlmTune.Autograd;
using VlmTune.Diagnostics;
using VlmTune.Inference;
using VlmTune.Checkpoints;
using VlmTune.Models;
using VlmTune.Quantization;
using VlmTune.Training;
using static TorchSharp.torch;
using VlmTune.Data;

namespace VlmTune.Cli.Commands;

/// <summary>
/// <c>vlmtune bench decode</c>: shape-true decoding throughput with random weights built from a config.json
/// (e.g. the released InternVL2-2B's). Prints one JSON line per result.
/// </summary>
internal static class BenchCommand
{
    private static readonly Option<string> Config = new("--config") { Description = "config.json giving the model shapes.", Required = true };
    private static readonly Option<string> Device = new("--device") { Description = $"{TensorPlacement.DeviceNames}.", DefaultValueFactory = _ => "cuda" };
    private static readonly Option<string?> DType = new("--dtype") { Description = $"{TensorPlacement.DTypeNames}. [default: float32 on CPU, bfloat16 on CUDA]" };
    private static readonly Option<int[]> Batch = new("--batch") { Description = "Batch sizes to measure.", DefaultValueFactory = _ => [1], AllowMultipleArgumentsPerToken = true };
    private static readonly Option<int> PromptTokens = new("--prompt-tokens") { Description = "Prompt length in tokens, image tokens included.", DefaultValueFactory = _ => 3400 };
    private static readonly Option<int> Tiles = new("--tiles") { Description = "Image tiles in the prompt (256 tokens each).", DefaultValueFactory = _ => 13 };
    private static readonly Option<int> NewTokens = new("--new-tokens") { Description = "Tokens decoded and timed per batch size.", DefaultValueFactory = _ => 128 };
    private static readonly Option<int> Warmup = new("--warmup") { Description = "Untimed decoding steps before the timed ones.", DefaultValueFactory = _ => 8 };
    private static readonly Option<bool?> Fused = new("--fused") { Description = "true: decode with the fused CUDA kernels, failing where they are unavailable; false: the TorchSharp path. [default: the fused kernels where supported]" };
    private static readonly Option<int> Check = new("--check") { Description = "Also run this many steps of both decoders from one prefilled cache and print how far their logits differ.", DefaultValueFactory = _ => 0 };

    public static Command Create(RuntimeSwitches switches)
    {
        var decode = new Command("decode", "Prefill an image prompt, then time greedy decoding.")
        {
            Config, Device, DType, Batch, PromptTokens, Tiles, NewTokens, Warmup, Fused, Check,
        };
        decode.SetAction((parse, ct) => CliErrors.RunAsync(() => Task.FromResult(Decode(parse, switches))));
        var train = new Command("train", "Time LoRA / QLoRA / full training steps on a synthetic batch.")
        {
            Config, Device, DType, Mode, Workload, TrainBatch, Tiles7, SeqLen, LoraR, Steps, TrainWarmup, Checkpointing, Optim,
        };
        train.SetAction((parse, ct) => CliErrors.RunAsync(() => Task.FromResult(Train(parse, switches))));
        var makeModel = new Command("make-model", "Write a model folder with random weights in the official layout (for end-to-end runs without a download).")
        {
            Config, TokenizerFrom, Out, Seed, InitDevice,
        };
        makeModel.SetAction((parse, ct) => CliErrors.RunAsync(() => Task.FromResult(MakeModel(parse))));
        return new Command("bench", "Performance benchmarks with random shape-true weights.") { decode, train, makeModel };
    }

    private static readonly Option<string> TokenizerFrom = new("--tokenizer-from") { Description = "Folder whose tokenizer and generation files are copied.", Required = true };
    private static readonly Option<string> Out = new("--out") { Description = "Folder for the model (must not exist, or be empty).", Required = true };
    private static readonly Option<string> InitDevice = new("--device") { Description = $"Where the random weights are drawn ({TensorPlacement.DeviceNames}): on CUDA a 2B model takes seconds, on the CPU minutes.", DefaultValueFactory = _ => "cpu" };
    private static readonly Option<long> Seed = new("--seed") { Description = "Seed of the random weights.", DefaultValueFactory = _ => 0 };

    private static int MakeModel(ParseResult parse)
    {
        string configPath = parse.GetValue(Config)!, from = parse.GetValue(TokenizerFrom)!, outDir = parse.GetValue(Out)!;
        var config = InternVLConfig.Load(configPath);
        if (Directory.Exists(outDir) && Directory.EnumerateFileSystemEntries(outDir).Any())
            throw new VlmTuneException($"{outDir}: not empty.");
        Directory.CreateDirectory(outDir);
        File.Copy(Directory.Exists(configPath) ? Path.Combine(configPath, "config.json") : configPath, Path.Combine(outDir, "config.json"));
        foreach (var name in new[] { "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "generation_config.json" })
            if (File.Exists(Path.Combine(from, name))) File.Copy(Path.Combine(from, name), Path.Combine(outDir, name));
        using var model = new InternVLChatModel(config, new ModelOptions { Device = TensorPlacement.ParseDevice(parse.GetValue(InitDevice)!), DType = ScalarType.BFloat16 });
        RandomInit.Apply(model, parse.GetValue(Seed));
        SafetensorsWriter.Write(Path.Combine(outDir, CheckpointFolder.SingleFile), model.named_parameters().Select(p => new KeyValuePair<string, Tensor>(p.name, p.parameter)));
        Console.WriteLine($"wrote {outDir} ({model.parameters().Sum(p => p.numel()):N0} parameters, bf16)");
        return 0;
    }

    private static readonly Option<string[]> Mode = new("--mode") { Description = "lora, qlora and/or full.", DefaultValueFactory = _ => ["lora"], AllowMultipleArgumentsPerToken = true };
    private static readonly Option<string> Workload = new("--workload")
    {
        Description = "long: 7 tiles × 1,900 tokens per sample (multi-tile documents); clot: 1 tile × 380 tokens (a CLoT-Oogiri-GO joke: one 448-px tile, a short answer). --tiles-per-sample and --seq-len override it.",
        DefaultValueFactory = _ => "long",
    };
    private static readonly Option<int> TrainBatch = new("--batch-size") { Description = "Samples per training step.", DefaultValueFactory = _ => 8 };
    private static readonly Option<int> Tiles7 = new("--tiles-per-sample") { Description = "Image tiles per sample (256 tokens each).", DefaultValueFactory = _ => 7 };
    private static readonly Option<int> SeqLen = new("--seq-len") { Description = "Tokens per sample (image tokens included).", DefaultValueFactory = _ => 1900 };
    private static readonly Option<int> LoraR = new("--lora-r") { Description = "LoRA rank (alpha is twice it); ignored by --mode full.", DefaultValueFactory = _ => 128 };
    private static readonly Option<int> Steps = new("--steps") { Description = "Timed training steps per mode.", DefaultValueFactory = _ => 10 };
    private static readonly Option<int> TrainWarmup = new("--warmup-steps") { Description = "Untimed steps before the timed ones.", DefaultValueFactory = _ => 3 };
    private static readonly Option<string[]> Optim = new("--optim")
    {
        Description = $"The recipe's optim, one or several (each mode runs with each): {string.Join(", ", TrainConfig.OptimNames)} (adamw_8bit: 8-bit block-wise AdamW states, docs/training.md).",
        DefaultValueFactory = _ => ["adamw"], AllowMultipleArgumentsPerToken = true,
    };
    private static readonly Option<bool> Checkpointing = new("--gradient-checkpointing") { Description = "Recompute the LLM layers' activations in the backward pass to save memory (--gradient-checkpointing false to keep them).", DefaultValueFactory = _ => true };

    /// <summary>
    /// The trainer's own step (<see cref="ModelPreparation"/>, <see cref="MicroBatchStep"/>, <see cref="TrainingOptimizer"/>:
    /// LoRA autocast, fp32 masters, chunked fp32 loss, clipping, AdamW) on random weights and a synthetic batch, with
    /// the recipe's defaults (TrainConfig: LoRA r=128 α=256 on the official targets and an untied head, projector
    /// trained, ViT frozen) and the options' overrides.
    /// </summary>
    private static int Train(ParseResult parse, RuntimeSwitches switches)
    {
        Cuda.AttentionBackends.ForTraining(switches);
        var device = TensorPlacement.ParseDevice(parse.GetValue(Device)!);
        var dtype = TensorPlacement.ParseDType(parse.GetValue(DType)) ?? ModelOptions.DefaultDType(device);
        var config = InternVLConfig.Load(parse.GetValue(Config)!);
        var (workloadTiles, workloadSeq) = parse.GetValue(Workload) switch
        {
            "long" => (7, 1900),
            "clot" => (1, 380),
            var other => throw new VlmTuneException($"--workload '{other}' is not long or clot."),
        };
        int Given(Option<int> option, int fallback) => parse.GetResult(option) is { Implicit: false } ? parse.GetValue(option) : fallback;
        int batch = parse.GetValue(TrainBatch), tiles = Given(Tiles7, workloadTiles), seq = Given(SeqLen, workloadSeq), r = parse.GetValue(LoraR);
        int imageTokens = tiles * config.NumImageToken;
        int imgContext = RandomImageContextId(config);
        if (seq < imageTokens + 16) throw new VlmTuneException($"--seq-len must exceed the {imageTokens} image tokens of {tiles} tiles.");
        var optims = parse.GetValue(Optim)!;
        foreach (var name in optims)
            if (TrainConfig.OptimProblem(name) is { } optimProblem) throw new VlmTuneException($"--optim: {optimProblem["'optim': ".Length..]}.");
        foreach (var (modeName, optimName) in parse.GetValue(Mode)!.SelectMany(m => optims.Select(o => (m, o))))
        {
            var mode = modeName switch { "lora" => TrainMode.Lora, "qlora" => TrainMode.Qlora, "full" => TrainMode.Full, _ => throw new VlmTuneException($"--mode '{modeName}' is not lora, qlora or full.") };
            var recipe = new TrainConfig
            {
                Model = parse.GetValue(Config)!, Mode = mode, LoraR = r, GradientCheckpointing = parse.GetValue(Checkpointing),
                Device = device.ToString(), Dtype = TensorPlacement.ShortName(dtype), AccumulativeCounts = 1, Optim = optimName,
            };
            using var memory = new GpuMemoryMonitor(device.index < 0 ? 0 : device.index);
            using var model = new InternVLChatModel(config, new ModelOptions { Device = device, DType = dtype });
            RandomInit.Apply(model, seed: 0);
            var flops = TrainingFlops.Of(model, recipe.TrainsVision);   // before NF4 packs the weights
            var prepared = ModelPreparation.Apply(model, recipe, dtype, _ => { }, nf4CudaKernel: switches.Nf4Kernel);
            string? nf4Check = mode == TrainMode.Qlora ? CheckNf4Kernel(prepared.QuantizedLlmWeights) : null;
            var seeds = new DropoutSeeds(recipe.Seed);
            ActivationCheckpointing.Apply(model.language_model, recipe.GradientCheckpointing, seeds);
            using var optimizer = new TrainingOptimizer(recipe, prepared.Trainable, dp: null, rank: 0, Console.Error.WriteLine, switches.FusedAdamW);
            optimizer.SetLearningRate(recipe.Lr);
            var counters = new DataCounters();
            var step = new MicroBatchStep(model, new ImageFeatureSupply(model, null, device, dtype, prepared.VisionTrainable, prepared.ProjectorTrainable),
                recipe, device, imgContext, counters, dp: null, warn: Console.Error.WriteLine);

            var rng = new Random(1);
            var ids = new long[batch * seq];
            var labels = new long[batch * seq];
            for (int b = 0; b < batch; b++)
                for (int i = 0; i < seq; i++)
                {
                    long id = i >= 16 && i < 16 + imageTokens ? imgContext : rng.Next(1000, Math.Min(90000, config.Llm.VocabSize - 1));
                    ids[b * seq + i] = id;
                    labels[b * seq + i] = i < Math.Min(16 + imageTokens + 40, seq - 16) ? -100 : id;   // prompt and image unsupervised
                }
            using var synthetic = new TrainBatch
            {
                // On the host, as the trainer's loader hands them over: the step moves them, as in training.
                Iteration = 0, InputIds = tensor(ids).view(batch, seq), Labels = tensor(labels).view(batch, seq),
                Pixels = randn(new long[] { batch * tiles, 3, 448, 448 }, dtype), SampleIds = [.. Enumerable.Range(0, batch).Select(i => $"synthetic-{i}")],
                Tokens = (long)batch * seq, Tiles = batch * tiles, Skipped = 0,
            };

            long iteration = 0;
            double Step()
            {
                seeds.StartMicroBatch(iteration);
                MemoryTrace.BeginIteration(iteration + 1, memory, switches.MemoryTraceIteration);
                manual_seed(seeds.ForMicroBatch());
                var result = step.Run(synthetic, iteration, cycleSize: 1, reduce: true, optimizer.Steps, stopRequested: false);
                optimizer.Step(iteration, synthetic.SampleIds, counters, Console.Error.WriteLine);
                MemoryTrace.Mark("optimizer step");
                iteration++;
                return result.Loss;
            }

            for (int i = 0; i < parse.GetValue(TrainWarmup); i++) Step();
            Sync(device);
            memory.Reset();
            var clock = Stopwatch.StartNew();
            int steps = parse.GetValue(Steps);
            double lastLoss = 0;
            for (int i = 0; i < steps; i++) lastLoss = Step();
            Sync(device);
            double perStep = clock.Elapsed.TotalSeconds / steps;
            double tokensPerS = batch * (double)seq / perStep;
            Console.WriteLine(JsonSerializer.Serialize(new
            {
                bench = "train", mode = modeName, workload = parse.GetValue(Workload), device = device.ToString(), dtype = dtype.ToString(), batch_size = batch, tiles_per_sample = tiles,
                seq_len = seq, lora_r = mode == TrainMode.Full ? 0 : r, lora_alpha = mode == TrainMode.Full ? 0 : recipe.LoraAlpha, gradient_checkpointing = recipe.GradientCheckpointing,
                s_per_step = Math.Round(perStep, 4), tokens_per_s = Math.Round(tokensPerS, 1), samples_per_s = Math.Round(batch / perStep, 2),
                mfu_h100_bf16 = Math.Round(flops.Mfu((long)batch * seq, (long)batch * tiles, perStep, 989.0), 4), loss = Math.Round(lastLoss, 4),
                trainable_params = prepared.TrainableCount,
                peak_gpu_mem_gib = memory.PeakBytes is { } peak ? Math.Round(peak / (double)(1L << 30), 2) : (double?)null,
                peak_gpu_mem_source = memory.Available ? memory.Source.ToString() : null,
                nf4_dequantize = nf4Check,
                fused_adamw = optimizer.Fused,
                optim = recipe.OptimizerName,
                optimizer_state_mib = Math.Round(optimizer.StateBytes / (double)(1 << 20), 1),
            }));
        }
        return 0;
    }

    /// <summary>The NF4 CUDA kernel against the tensor-op path on every quantised weight: bit-identical or not.</summary>
    private static string? CheckNf4Kernel(IReadOnlyList<(string Name, Nf4Tensor Weight)> weights)
    {
        if (weights.Count == 0 || weights[0].Weight.Packed.device_type != DeviceType.CUDA) return null;
        int identical = 0;
        var differing = new List<string>();
        foreach (var (name, w) in weights)
        {
            using var scope = NewDisposeScope();
            var kernel = Nf4CudaDequantizer.TryDequantize(w, ScalarType.BFloat16);
            if (kernel is null) return $"tensor ops ({Nf4CudaDequantizer.Unavailable ?? "kernel disabled"})";
            var reference = w.DequantizeWithTensorOps(ScalarType.BFloat16);
            if (kernel.to_type(ScalarType.Float32).eq(reference.to_type(ScalarType.Float32)).all().item<bool>()) identical++;   // bf16 → fp32 is exact
            else differing.Add($"{name} (max |diff| {(kernel.to_type(ScalarType.Float32) - reference.to_type(ScalarType.Float32)).abs().max().item<float>():g})");
        }
        return $"cuda kernel: {identical}/{weights.Count} weights identical to the tensor-op path" + (differing.Count == 0 ? "" : "; differ: " + string.Join(", ", differing.Take(3)));
    }

    private static int Decode(ParseResult parse, RuntimeSwitches switches)
    {
        Cuda.AttentionBackends.ForServing(switches);
        var device = TensorPlacement.ParseDevice(parse.GetValue(Device)!);
        var dtype = TensorPlacement.ParseDType(parse.GetValue(DType)) ?? ModelOptions.DefaultDType(device);
        var config = InternVLConfig.Load(parse.GetValue(Config)!);
        using var memory = new GpuMemoryMonitor(device.index < 0 ? 0 : device.index);
        using var model = new InternVLChatModel(config, new ModelOptions { Device = device, DType = dtype });
        RandomInit.Apply(model, seed: 0);
        model.eval();
        int tiles = parse.GetValue(Tiles), promptTokens = parse.GetValue(PromptTokens), newTokens = parse.GetValue(NewTokens);
        int imageTokens = tiles * config.NumImageToken;
        if (promptTokens < imageTokens + 8) throw new VlmTuneException($"--prompt-tokens must exceed the {imageTokens} image tokens of {tiles} tiles.");
        int imgContext = RandomImageContextId(config);
        int checkSteps = parse.GetValue(Check);
        FusedDecoder? fused = null;
        if (parse.GetValue(Fused) != false)
        {
            fused = FusedDecoder.TryGet(model.language_model, switches.FusedDecode, out var reason);
            if (fused is null && parse.GetValue(Fused) == true) throw new VlmTuneException($"--fused true: the fused decoder is unavailable: {reason}");
            if (fused is null) Console.Error.WriteLine($"fused decoding unavailable ({reason}); timing the TorchSharp path");
        }

        foreach (int batch in parse.GetValue(Batch)!)
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var rng = new Random(batch);
            var ids = Enumerable.Range(0, promptTokens).Select(i => i >= 40 && i < 40 + imageTokens ? imgContext : (long)rng.Next(1000, 90000)).ToArray();
            var input = tensor(ids, device: device).unsqueeze(0).expand(batch, promptTokens).contiguous();
            var pixels = randn(new long[] { tiles * batch, 3, 448, 448 }, dtype, device);

            Sync(device);
            var clock = Stopwatch.StartNew();
            var features = model.ExtractFeatures(pixels);
            Sync(device);
            double visionS = clock.Elapsed.TotalSeconds;
            clock.Restart();
            using var cache = new KvCache(config.Llm, batch, promptTokens + newTokens + parse.GetValue(Warmup), dtype, device);
            var embeds = model.EmbedWithImages(input, features, imgContext);
            var hidden = model.language_model.Forward(embeds, new DecoderInputs { Cache = cache });
            var next = model.language_model.Logits(hidden[.., ^1..]).argmax(-1);               // (B, 1)
            Sync(device);
            double prefillS = clock.Elapsed.TotalSeconds;

            if (checkSteps > 0 && fused is not null) CheckFused(model.language_model, fused, switches.FusedTuning, cache, next, checkSteps, batch, device);

            // Greedy steps stay on the device: no host synchronisation inside the loop.
            Tensor Step(Tensor token)
            {
                using var stepScope = NewDisposeScope();
                if (fused is not null && fused.CanStep(cache))
                    return fused.Greedy(fused.Step(token, cache, tuning: switches.FusedTuning)).MoveToOuterDisposeScope();
                var h = model.language_model.Forward(model.language_model.Embed(token), new DecoderInputs { Cache = cache });
                return model.language_model.Logits(h).argmax(-1).MoveToOuterDisposeScope();
            }
            for (int i = 0; i < parse.GetValue(Warmup); i++) next = Step(next);
            Sync(device);
            var graphsBefore = fused?.GraphCounts ?? default;
            clock.Restart();
            for (int i = 0; i < newTokens; i++) next = Step(next);
            Sync(device);
            double decodeS = clock.Elapsed.TotalSeconds;
            var graphsAfter = fused?.GraphCounts ?? default;
            Console.WriteLine(JsonSerializer.Serialize(new
            {
                bench = "decode", device = device.ToString(), dtype = dtype.ToString(), fused = fused is not null, batch, prompt_tokens = promptTokens, tiles,
                new_tokens = newTokens, vision_s = Math.Round(visionS, 4), prefill_s = Math.Round(prefillS, 4),
                decode_step_ms = Math.Round(decodeS / newTokens * 1000, 3),
                decode_tokens_per_s = Math.Round(batch * newTokens / decodeS, 1),
                // VLMTUNE_CUDA_GRAPHS=1: of the timed steps, how many were captured into a CUDA graph and replayed from one.
                cuda_graphs = fused is not null && switches.FusedTuning.Graphs,
                graph_captures = graphsAfter.Captures - graphsBefore.Captures, graph_replays = graphsAfter.Replays - graphsBefore.Replays,
                graphs_disabled = fused?.GraphsDisabledReason,
                peak_gpu_mem_gib = memory.PeakBytes is { } peak ? Math.Round(peak / (double)(1L << 30), 2) : (double?)null,
                peak_gpu_mem_source = memory.Available ? memory.Source.ToString() : null,
            }));
        }
        return 0;
    }


    /// <summary>
    /// Runs <paramref name="steps"/> steps of the TorchSharp decoder and of the fused one, each on its own copy of the
    /// prefilled cache, both fed the reference's greedy tokens. Rows after the first see a left-padded cache (their first
    /// r·L/(2B) columns masked, positions shifted to match) as the engine's right-aligned batches do. Prints one JSON line.
    /// </summary>
    /// <summary>
    /// The &lt;IMG_CONTEXT&gt; id of a random-weight model (no tokenizer): the last id of the vocabulary, which the random
    /// text ids (1000…90000) never hit. Its value changes nothing in the timing.
    /// </summary>
    private static int RandomImageContextId(InternVLConfig config) => config.Llm.VocabSize - 1;

    /// <summary>A greedy choice whose top-2 logit margin exceeds this is "clear" in the check's agreement count.</summary>
    private const double ClearMargin = 0.25;

    private static void CheckFused(CausalLanguageModel lm, FusedDecoder fused, FusedDecodeTuning tuning, KvCache prefilled, Tensor first, int steps, int batch, Device device)
    {
        using var scope = NewDisposeScope();
        long length = prefilled.Length;
        var rows = Enumerable.Range(0, batch).Select(r => new KvRow(prefilled, r, length)).ToList();
        using var reference = KvCache.Stack(rows, length + steps);
        using var candidate = KvCache.Stack(rows, length + steps);
        var starts = Enumerable.Range(0, batch).Select(r => r * (length / (2 * batch))).ToArray();   // up to half the columns masked
        var firstColumn = tensor(starts.Select(s => (int)s).ToArray(), device: device);
        var startsTensor = tensor(starts, device: device).view(batch, 1);
        var token = first.view(batch, 1);
        double maxDiff = 0, maxAbs = 0, firstDiff = 0;
        long agree = 0, clearRows = 0, clearAgree = 0;
        for (int i = 0; i < steps; i++)
        {
            using var step = NewDisposeScope();
            var positions = (tensor(length + i, device: device) - startsTensor).contiguous();            // (B, 1)
            var keyMask = arange(length + i + 1, device: device).unsqueeze(0) >= startsTensor;        // (B, S+1)
            var h = lm.Forward(lm.Embed(token), new DecoderInputs { PositionIds = positions, Cache = reference, KeyMask = keyMask });
            var want = lm.Logits(h)[.., 0];                                                             // (B, V)
            var got = fused.Step(token, candidate, positions, firstColumn, tuning);
            double diff = (want.to_type(ScalarType.Float32) - got.to_type(ScalarType.Float32)).abs().max().item<float>();
            if (i == 0) firstDiff = diff;
            maxDiff = Math.Max(maxDiff, diff);
            maxAbs = Math.Max(maxAbs, want.to_type(ScalarType.Float32).abs().max().item<float>());
            var wantIds = want.argmax(-1);
            var same = wantIds.eq(fused.Greedy(got).view(batch));
            agree += same.sum().item<long>();
            // Random weights give nearly flat logits, so near-ties flip on rounding noise; count the clear choices apart.
            var top2 = want.to_type(ScalarType.Float32).topk(2, -1).values;                              // (B, 2)
            var clear = (top2[.., 0] - top2[.., 1]) > ClearMargin;
            clearRows += clear.sum().item<long>();
            clearAgree += same.logical_and(clear).sum().item<long>();
            token = wantIds.view(batch, 1).contiguous().MoveToOuterDisposeScope();
        }
        Console.WriteLine(JsonSerializer.Serialize(new
        {
            check = "fused_decode", batch, steps, prompt_tokens = length, ragged_rows = batch > 1,
            first_step_max_abs_logit_diff = Math.Round(firstDiff, 5), max_abs_logit_diff = Math.Round(maxDiff, 5),
            max_abs_logit = Math.Round(maxAbs, 3), greedy_agreement = Math.Round(agree / (double)(steps * batch), 4),
            clear_margin = ClearMargin, clear_choices = clearRows, clear_choice_agreement = clearRows == 0 ? (double?)null : Math.Round(clearAgree / (double)clearRows, 4),
        }));
    }

    private static void Sync(Device device)
    {
        if (device.type == DeviceType.CUDA) cuda.synchronize(device);
    }
}
