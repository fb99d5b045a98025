using TorchSharp;
using TorchSharp.Modules;
using VlmTune.Checkpoints;
using VlmTune.Data;
using VlmTune.Distributed;
using static TorchSharp.torch;

namespace VlmTune.Training;

/// <summary>
/// The optimizer side of a run: AdamW over fp32 master weights (bf16 parameters are trained through fp32 copies,
/// held in host memory with optimizer_offload), gradient clipping with the non-finite check, the ZeRO-1 partition of
/// the optimizer state over data-parallel ranks, and the optimizer's part of a checkpoint. On CUDA the clipping and the
/// update run as three multi-tensor kernels (<see cref="FusedAdamW"/>) over TorchSharp's own AdamW state. With
/// optim: adamw_8bit the moments are 8-bit block-wise (<see cref="AdamW8bit"/>; on CUDA <see cref="FusedAdamW8bit"/>).
/// </summary>
public sealed class TrainingOptimizer : IDisposable
{
    private readonly TrainConfig _config;
    private readonly IReadOnlyList<(string Name, Parameter Param)> _trainable;
    private readonly DataParallel? _dp;
    private readonly ZeroPartition? _zero;
    private readonly int _rank;
    private readonly MasterWeights _masters;
    private readonly AdamW? _adamW;          // optim: adamw
    private readonly AdamW8bit? _adamW8bit;  // optim: adamw_8bit
    private readonly FusedAdamW? _fused;
    private readonly FusedAdamW8bit? _fused8bit;

    /// <summary>Optimizer steps taken (including those before a resume).</summary>
    public long Steps { get; private set; }
    public int ZeroStage => _zero is null ? 0 : 1;
    private const double AdamEps = 1e-8;

    /// <summary>Whether the step runs the fused CUDA kernels (false: TorchSharp's AdamW, or the 8-bit reference ops, after libtorch's clipping).</summary>
    public bool Fused => _fused is not null || _fused8bit is not null;

    /// <summary>Bytes this rank's optimizer moments take (fp32: 8 a parameter; 8-bit: codes and absmax, see <see cref="AdamW8bit"/>).</summary>
    public long StateBytes { get; }

    /// <summary>The 8-bit optimizer, with optim: adamw_8bit (its codes and absmax, for tests and tools).</summary>
    public AdamW8bit? EightBit => _adamW8bit;

    /// <param name="fusedKernel">Use the fused CUDA step where the tensors allow (VLMTUNE_FUSED_ADAMW, <see cref="RuntimeSwitches.FusedAdamW"/>).</param>
    public TrainingOptimizer(TrainConfig config, IReadOnlyList<(string Name, Parameter Param)> trainable, DataParallel? dp, int rank, Action<string> info, bool fusedKernel = true)
    {
        _config = config;
        _trainable = trainable;
        _dp = dp;
        _rank = rank;
        var optimized = trainable;
        if (dp is not null && config.ZeroStage == 1)
        {
            _zero = ZeroPartition.Plan(trainable.Select(t => (t.Name, t.Param.numel())).ToList(), dp.WorldSize);
            optimized = trainable.Where(t => _zero.Owner[t.Name] == rank).ToList();
            info($"zero-1: rank {rank} keeps the optimizer state of {optimized.Count} of {trainable.Count} tensors " +
                 $"({optimized.Sum(t => t.Param.numel()):N0} parameters; load imbalance {_zero.Imbalance:F2})");
            if (optimized.Count == 0)
                throw new VlmTuneException($"zero_stage 1: rank {rank} owns no trainable tensor ({trainable.Count} tensors over {dp.WorldSize} ranks); use zero_stage: 0.");
        }
        _masters = MasterWeights.Create(optimized, config.OptimizerOffload ? CPU : null);
        if (config.OptimizerOffload)
            info($"optimizer offload: fp32 masters and AdamW state of {optimized.Sum(t => t.Param.numel()):N0} parameters in host memory, AdamW on the CPU");
        else if (_masters.Any) info("bf16 weights are trained through fp32 master copies (the optimizer updates the masters)");
        var updated = _masters.OptimizerParameters.ToList();
        long fp32Bytes = AdamW8bit.Fp32StateBytes(updated);
        bool cuda = updated.Count > 0 && updated[0].device.type == DeviceType.CUDA;
        if (config.Adam8bit)
        {
            _adamW8bit = new AdamW8bit(updated, config.Lr, config.Betas[0], config.Betas[1], AdamEps, config.WeightDecay);
            StateBytes = _adamW8bit.StateBytes;
            var blockwise = _adamW8bit.States.Where(s => s.Blockwise).ToList();
            info($"optimizer: {config.Optim}, 8-bit block-wise AdamW states (bitsandbytes' AdamW8bit, blocks of {AdamW8bit.BlockSize}): {Mib(StateBytes)} " +
                 $"for {updated.Sum(p => p.numel()):N0} parameters (fp32 states: {Mib(fp32Bytes)}); {blockwise.Count} of {updated.Count} tensors 8-bit " +
                 $"({blockwise.Sum(s => s.Param.numel()):N0} parameters)" +
                 (blockwise.Count < updated.Count ? $", the others under {_adamW8bit.MinBlockwiseSize:N0} elements keep fp32 states" : "") +
                 (config.Optim == "paged_adamw_8bit" ? "; not paged: the states stay in device memory (vlmtune has no unified-memory paging)" : ""));
            if (fusedKernel && cuda)
            {
                _fused8bit = FusedAdamW8bit.TryCreate(_adamW8bit, out var whyNot);
                info(_fused8bit is null ? $"fused 8-bit AdamW unavailable ({whyNot}); using tensor ops"
                    : $"8-bit AdamW: fused CUDA step over {updated.Count} tensors (clip + update in three kernels)");
            }
            return;
        }
        _adamW = optim.AdamW(_masters.OptimizerParameters, config.Lr, config.Betas[0], config.Betas[1], AdamEps, config.WeightDecay);
        StateBytes = fp32Bytes;
        info($"optimizer: AdamW, fp32 states: {Mib(StateBytes)} for {updated.Sum(p => p.numel()):N0} parameters" +
             (config.OptimizerOffload ? " (host memory)" : ""));
        if (fusedKernel && cuda)
        {
            _fused = FusedAdamW.TryCreate(_adamW, updated, config.Betas[0], config.Betas[1], AdamEps, config.WeightDecay, out var whyNot);
            info(_fused is null ? $"fused AdamW unavailable ({whyNot}); using TorchSharp's AdamW"
                : $"AdamW: fused CUDA step over {updated.Count} tensors (clip + update in three kernels)");
        }
    }

    private static string Mib(long bytes) => $"{bytes / (double)(1 << 20):N1} MiB";

    private double LearningRate => _adamW8bit?.LearningRate ?? _adamW!.ParamGroups.First().LearningRate;

    public void SetLearningRate(double lr)
    {
        if (_adamW8bit is not null) _adamW8bit.LearningRate = lr;
        else foreach (var group in _adamW!.ParamGroups) group.LearningRate = lr;
    }

    /// <summary>
    /// Clips, checks and applies the accumulated gradients; returns the gradient norm before clipping. A non-finite
    /// norm stops the run or, with nan_policy: skip, skips the step (counted in <paramref name="counters"/>).
    /// </summary>
    public double Step(long iteration, IReadOnlyList<string> samples, DataCounters counters, Action<string> warn)
    {
        _dp?.FinishGradients();   // every rank now holds the global batch's gradient
        _masters.GradientsToMasters();
        // Every trainable tensor takes part in every step, with a zero gradient where the cycle gave it none (the
        // projector after text-only batches), as under data parallelism and DeepSpeed. AdamW skips a tensor without a
        // gradient but moves one with a zero gradient (momentum, weight decay): the step must not depend on whether a
        // gradient tensor happens to exist, which a resumed run's do not until their first use.
        _masters.FillMissingGradients();
        // The norm covers every trainable tensor; under ZeRO-1 the ones another rank updates count through their
        // (identical, reduced) model gradients.
        var withGrad = _masters.OptimizerParameters
            .Concat(_zero is null ? [] : _trainable.Where(t => _zero.Owner[t.Name] != _rank).Select(t => t.Param))
            .Where(Gradients.Has).ToList();
        // Fused: clipped and applied on the GPU, skipped there when the norm is not finite (then handled below). Under
        // ZeRO-1 the norm also covers other ranks' model gradients, which may be bf16: then this step takes the
        // per-tensor path.
        bool fused = (_fused is not null || _fused8bit is not null) && withGrad.All(FusedAdamW.Accepts);
        double norm = !fused ? nn.utils.clip_grad_norm_(withGrad, _config.MaxNorm)
            : _fused8bit?.Step(withGrad, _config.MaxNorm) ?? _fused!.Step(withGrad, LearningRate, _config.MaxNorm);
        if (!double.IsFinite(norm))
        {
            string what = $"iteration {iteration + 1} (optimizer step {Steps + 1}): the gradient norm is {norm} after samples {string.Join(", ", samples)}";
            if (_config.NanPolicy == NanPolicy.Stop)
                throw new TrainingDivergedException($"{what}; stopping (set nan_policy: skip to skip such steps).");
            counters.AddNanSkipped();
            warn($"{what}; optimizer step skipped ({counters.NanSkipped} so far)");
            ClearGradients();
            return norm;
        }
        if (!fused)
        {
            // The gradients are clipped already (clip_grad_norm_ scaled them in place).
            if (_adamW8bit is not null) _adamW8bit.Step();
            else _adamW!.step();
            ClearGradients();
        }
        else ClearOtherRanksGradients();   // the kernel zeroed the gradients it used
        _masters.MastersToModel();
        // ZeRO-1: each tensor's owner updated it; everyone takes the owner's new value.
        if (_zero is not null) _dp!.BroadcastFromOwners(_trainable.Select(t => ((Tensor)t.Param, _zero.Owner[t.Name])).ToList());
        Steps++;
        return norm;
    }

    /// <summary>Drops the gradients of an unfinished accumulation cycle (a stop mid-cycle).</summary>
    public void DropGradients()
    {
        ClearGradients();
        _masters.ZeroModelGradients();
    }

    private void ClearGradients()
    {
        if (_adamW8bit is not null) _adamW8bit.ZeroGrad();
        else Gradients.Zero(_masters.OptimizerParameters);   // optim.AdamW's zero_grad leaves a handle per tensor to the GC
        ClearOtherRanksGradients();
    }

    /// <summary>ZeRO-1: the model gradients of tensors another rank updates (this rank's optimizer never sees them).</summary>
    private void ClearOtherRanksGradients()
    {
        if (_zero is null) return;
        Gradients.Zero(_trainable.Where(t => _zero.Owner[t.Name] != _rank).Select(t => (Tensor)t.Param));
    }

    /// <summary>Name → fp32 master of the tensors this rank optimises (a master is the parameter itself where that is fp32).</summary>
    public IReadOnlyDictionary<string, Tensor> Masters() => _masters.Pairs.ToDictionary(p => p.Name, p => (Tensor)p.Master);

    /// <summary>
    /// Name → fp32 value of every trained non-LoRA tensor. Under ZeRO-1 a master lives on its owner only, so each is
    /// broadcast from there (every rank takes part; the temporaries go into <paramref name="temporaries"/>).
    /// </summary>
    public List<KeyValuePair<string, Tensor>> TrainedNonLoraMasters(List<Tensor> temporaries)
    {
        var masters = Masters();
        var result = new List<KeyValuePair<string, Tensor>>();
        var transfers = new List<(Tensor, int)>();
        foreach (var (name, param) in _trainable.Where(t => !t.Name.Contains(".lora_")))
        {
            if (masters.TryGetValue(name, out var master) && _zero is null) { result.Add(new(name, master)); continue; }
            int owner = _zero!.Owner[name];
            var value = owner == _rank ? masters[name] : empty(param.shape, ScalarType.Float32, param.device).DetachFromDisposeScope();
            if (owner != _rank) temporaries.Add(value);
            transfers.Add((value, owner));
            result.Add(new(name, value));
        }
        if (transfers.Count > 0) _dp!.BroadcastFromOwners(transfers);
        return result;
    }

    /// <summary>This rank's optimizer file in a checkpoint: the whole state, or its ZeRO-1 shard.</summary>
    public string StateFileName => _zero is null ? IterCheckpoint.OptimizerFile : IterCheckpoint.OptimizerShardFile(_rank);

    /// <summary>Writes the optimizer state into a checkpoint folder being written (ZeRO-1: every rank its shard; else rank 0).</summary>
    public void SaveState(string dir)
    {
        if (_zero is null && _rank != 0) return;
        string path = Path.Combine(dir, StateFileName);
        if (_adamW8bit is null) { _adamW!.save_state_dict(path); return; }
        using var stream = new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20);
        using var writer = new BinaryWriter(stream);
        _adamW8bit.Save(writer);
    }

    /// <summary>Restores masters (exact fp32 values where the model rounds) from a checkpoint's weights file.</summary>
    public void LoadMasters(SafetensorsFile file, Func<string, string?>? nameInFile = null) => _masters.Load(file, nameInFile);

    /// <summary>
    /// Restores the optimizer state from <paramref name="file"/>; one written by the other optimizer (adamw vs adamw_8bit)
    /// is refused in one line naming it: the two states do not convert without changing the run.
    /// </summary>
    public void LoadState(string file, long steps)
    {
        bool eightBitFile = AdamW8bit.IsStateFile(file);
        if (eightBitFile != (_adamW8bit is not null))
            throw new VlmTuneException($"--resume: {file} holds {(eightBitFile ? "8-bit AdamW states (optim: adamw_8bit)" : "fp32 AdamW states (optim: adamw)")} " +
                                       $"but this run has optim: {_config.Optim}; the two do not convert: resume with optim: {(eightBitFile ? "adamw_8bit" : "adamw")}, or start a new run.");
        if (_adamW8bit is null) CheckpointFiles.LoadOptimizer(_adamW!, file);
        else
        {
            CheckpointFiles.LoadOptimizer(file, _adamW8bit.Load, _adamW8bit.Save, "8-bit AdamW state");
            if (_adamW8bit.Steps != steps)
                throw new VlmTuneException($"--resume: {file} is at optimizer step {_adamW8bit.Steps} but the checkpoint's trainer state says {steps}; the checkpoint is damaged: resume from an earlier iter_<n> (or start fresh without --resume).");
        }
        Steps = steps;
    }

    public void Dispose()
    {
        _fused?.Dispose();
        _fused8bit?.Dispose();
        _adamW?.Dispose();
        _adamW8bit?.Dispose();
        _masters.Dispose();
    }
}
