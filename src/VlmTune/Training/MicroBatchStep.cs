using TorchSharp;
using VlmTune.Autograd;
using VlmTune.Data;
using VlmTune.Distributed;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Training;

/// <summary>A micro-batch's loss (NaN: nothing learned) and the tokens and tiles it trained on, over all ranks.</summary>
public readonly record struct MicroBatchResult(double Loss, long Tokens, long Tiles);

/// <summary>
/// One micro-batch's forward and backward pass, the trainer's and the training benchmark's: image embeddings, the
/// decoder, the chunked fp32 loss and its backward pass scaled for accumulation. When data-parallel, ranks first agree
/// on the supervised-token count and each weighs its loss by its share of it, so the summed gradients are the token
/// mean over the global batch (what one process with the whole batch computes). The same agreement carries NaN
/// verdicts and stop requests, so every rank takes the same branch.
/// </summary>
public sealed class MicroBatchStep(InternVLChatModel model, ImageFeatureSupply images, TrainConfig config, Device device, int imageContextId,
    DataCounters counters, DataParallel? dp, Action<string> warn)
{
    /// <summary>Some rank was asked to stop (data-parallel: known to every rank after the same micro-batch).</summary>
    public bool StopAgreed { get; private set; }

    /// <param name="cycleSize">Micro-batches of this accumulation cycle (the loss is divided by it).</param>
    /// <param name="reduce">The cycle's last micro-batch: data-parallel gradients are reduced in its backward pass.</param>
    public MicroBatchResult Run(TrainBatch batch, long iteration, long cycleSize, bool reduce, long optimizerSteps, bool stopRequested)
    {
        using var scope = NewDisposeScope();
        Tensor? loss = null;
        long localTokens = 0;
        double value = double.NaN;
        long towerTiles = 0;
        if (!batch.IsEmpty)
        {
            // Counted on the host, where the loader's batches are: on the GPU it would wait for the vision tower.
            long? imageSlots = batch.InputIds.device_type == DeviceType.CPU ? batch.InputIds.eq(imageContextId).sum().item<long>() : null;
            var ids = batch.InputIds.to(device);
            var labels = batch.Labels.to(device);
            var features = images.Embeddings(batch, out towerTiles);
            VlmTune.Diagnostics.MemoryTrace.Mark("vision + projector");
            var embeds = model.EmbedWithImages(ids, features, imageContextId, imageSlots);
            VlmTune.Diagnostics.MemoryTrace.Mark("embeddings");
            var hidden = model.language_model.Forward(embeds, new DecoderInputs { Packing = batch.Packing, RopeLength = batch.RopeLength });
            VlmTune.Diagnostics.MemoryTrace.Mark("decoder forward");
            (loss, localTokens) = CausalLmLoss.Compute(hidden, labels, model.language_model.OutputHead, config.LossChunkSize);
            VlmTune.Diagnostics.MemoryTrace.Mark("loss");
            if (localTokens > 0) value = loss.item<float>();
        }
        bool localBad = localTokens > 0 && !double.IsFinite(value);
        double tokens = localTokens, lossSum = localTokens > 0 && !localBad ? value * localTokens : 0, bad = localBad ? 1 : 0;
        long batchTokens = batch.Tokens, tiles = towerTiles;   // MFU counts the ViT's work: cached tiles skip it
        if (dp is not null)
        {
            var sums = dp.SumOverRanks(tokens, lossSum, bad, stopRequested ? 1 : 0, batchTokens, tiles);
            (tokens, lossSum, bad) = (sums[0], sums[1], sums[2]);
            StopAgreed |= sums[3] > 0;
            (batchTokens, tiles) = ((long)sums[4], (long)sums[5]);
        }
        dp?.BeginBackward(reduce);
        if (tokens == 0)
        {
            if (!batch.IsEmpty || dp is not null)
                warn($"iteration {iteration + 1}: {(batch.IsEmpty ? "no usable sample" : $"samples {string.Join(", ", batch.SampleIds)} have no supervised token")}{(dp is null ? "" : " on any rank")}; nothing to learn");
            return new(double.NaN, batchTokens, tiles);
        }
        if (bad > 0)
        {
            string where = localBad ? $"the loss is {value} on samples {string.Join(", ", batch.SampleIds)}" : "the loss is not finite on another rank";
            string what = $"iteration {iteration + 1} (optimizer step {optimizerSteps + 1}): {where}";
            if (config.NanPolicy == NanPolicy.Stop)
                throw new TrainingDivergedException($"{what}; stopping (set nan_policy: skip to skip such micro-batches).");
            counters.AddNanSkipped();
            warn($"{what}; micro-batch skipped ({counters.NanSkipped} so far)");
            return new(double.NaN, batchTokens, tiles);
        }
        if (localTokens > 0)
        {
            var scaled = dp is null ? loss! / cycleSize : loss! * (localTokens / tokens / cycleSize);
            scaled.backward();
            VlmTune.Diagnostics.MemoryTrace.Mark("backward done");
        }
        BackwardScratch.Release();
        return new(lossSum / tokens, batchTokens, tiles);
    }
}
