using TorchSharp;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Inference;

/// <summary>Why generation ended, named as the OpenAI API names it.</summary>
public enum FinishReason { Stop, Length, Cancelled }

public sealed record GenerationResult(IReadOnlyList<int> TokenIds, FinishReason FinishReason, int PromptTokens);

/// <summary>
/// Autoregressive decoding of one sequence with a KV cache: one prefill pass over the prompt (with image embeddings
/// spliced in), then one pass per new token. The stop token is not part of the result.
/// </summary>
public static class TokenGenerator
{
    /// <summary><paramref name="switches"/>: the fused decoding switches (null: <see cref="RuntimeSwitches.Defaults"/>).</summary>
    public static GenerationResult Generate(
        InternVLChatModel model, IReadOnlyList<int> promptIds, Tensor? imageFeatures, int imageContextId,
        SamplingOptions sampling, IReadOnlySet<int> stopIds, Action<int>? onToken = null, CancellationToken cancellation = default,
        RuntimeSwitches? switches = null, bool allowFused = true)
    {
        switches ??= RuntimeSwitches.Defaults;
        var problems = sampling.Validate().ToList();
        if (problems.Count > 0) throw new VlmTuneException(string.Join(" ", problems));
        var device = model.Options.Device;
        var lm = model.language_model;
        var generated = new List<int>();
        using var noGrad = no_grad();
        using var cache = new KvCache(lm.Config, 1, promptIds.Count + sampling.MaxNewTokens, model.Options.DType, device);
        using var sampler = new Sampler(sampling);
        // Decode steps use the fused CUDA kernels where the model allows, unless the switch turns them off. allowFused
        // false: weights that change between calls (a model in training) must not be packed once and cached.
        var fused = allowFused && device.type == DeviceType.CUDA ? FusedDecoder.TryGet(lm, switches.FusedDecode, out _) : null;
        Tensor? seen = sampling.RepetitionPenalty != 1.0
            ? tensor(promptIds.Select(i => (long)i).ToArray(), device: device).unsqueeze(0).DetachFromDisposeScope()
            : null;
        try
        {
            Tensor logits;
            using (var scope = NewDisposeScope())
            {
                var ids = tensor(promptIds.Select(i => (long)i).ToArray(), device: device).unsqueeze(0);   // (1, T)
                var embeds = model.EmbedWithImages(ids, imageFeatures, imageContextId);
                var hidden = lm.Forward(embeds, new DecoderInputs { Cache = cache });
                logits = lm.Logits(hidden[.., ^1..])[.., 0].MoveToOuterDisposeScope();               // (1, V)
            }
            while (true)
            {
                if (cancellation.IsCancellationRequested) { logits.Dispose(); return new(generated, FinishReason.Cancelled, promptIds.Count); }
                using var scope = NewDisposeScope();
                var next = sampler.Next(logits, seen);                                                  // (1)
                logits.Dispose();
                int id = (int)next.item<long>();
                if (stopIds.Contains(id)) return new(generated, FinishReason.Stop, promptIds.Count);
                generated.Add(id);
                onToken?.Invoke(id);
                if (generated.Count >= sampling.MaxNewTokens) return new(generated, FinishReason.Length, promptIds.Count);
                if (seen is not null)
                {
                    var grown = cat([seen, next.view(1, 1)], 1).DetachFromDisposeScope();
                    seen.Dispose();
                    seen = grown;
                }
                if (fused is not null && fused.CanStep(cache))
                {
                    logits = fused.Step(next.view(1, 1).to_type(ScalarType.Int64).contiguous(), cache, tuning: switches.FusedTuning).MoveToOuterDisposeScope();   // (1, V)
                    continue;
                }
                var hidden = lm.Forward(lm.Embed(next.view(1, 1)), new DecoderInputs { Cache = cache });
                logits = lm.Logits(hidden)[.., 0].MoveToOuterDisposeScope();
            }
        }
        finally { seen?.Dispose(); }
    }
}
