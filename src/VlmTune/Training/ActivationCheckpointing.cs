using TorchSharp;
using VlmTune.Autograd;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Training;

/// <summary>
/// Gradient (activation) checkpointing of LLM decoder layers: the forward pass keeps only each layer's input;
/// the backward pass runs the layer again with the same random state and backpropagates through it. Memory for
/// activations drops from all layers to one, for about one extra forward pass of compute. With offloading, the kept
/// inputs wait in pinned host memory instead (copied asynchronously, on the compute stream so no synchronisation is
/// needed): the GPU then holds no per-layer activation at all between the forward and the backward pass.
/// </summary>
public static class ActivationCheckpointing
{
    /// <summary>
    /// Sets <see cref="CausalLanguageModel.LayerRunner"/> to a checkpointing runner (or clears it).
    /// <paramref name="layerBackwardDone"/> is told (on autograd's thread) when a layer's backward has produced its
    /// weights' gradients: data parallelism starts reducing them then, while the layers below still run.
    /// </summary>
    /// <param name="offloadInputs">Keep each layer's input in (pinned) host memory until its backward pass.</param>
    public static void Apply(CausalLanguageModel model, bool enabled, DropoutSeeds seeds, Action<int>? layerBackwardDone = null, bool offloadInputs = false)
    {
        if (!enabled) { model.LayerRunner = null; return; }
        model.LayerRunner = (layer, x, rope, inputs) =>
        {
            if (!is_grad_enabled()) return layer.Forward(x, rope, inputs);
            // Frozen embeddings give an input that needs no grad; the checkpoint must still run its backward so the
            // layer's own trainable weights (LoRA) get gradients, as HF's enable_input_require_grads() arranges.
            if (!x.requires_grad) x = x.detach().requires_grad_(true);
            long seed = seeds.ForLayer(layer.Index);
            return LeanAutograd.AfterApply(CheckpointedLayer.apply(x, rope.Cos, rope.Sin, rope.Positions, new LayerCall(layer, rope.Theta, inputs, seed, layerBackwardDone, offloadInputs)));
        };
    }

    internal sealed record LayerCall(DecoderLayer Layer, double Theta, DecoderInputs Inputs, long Seed, Action<int>? BackwardDone, bool Offload);

    /// <summary>Holds a layer input copied to host memory (not a saved variable: autograd must not see it).</summary>
    internal sealed record HostCopy(Tensor Value, Device Device);

    internal sealed class CheckpointedLayer : autograd.SingleTensorFunction<CheckpointedLayer>
    {
        public override string Name => nameof(CheckpointedLayer);

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            Tensor x = (Tensor)vars[0], cos = (Tensor)vars[1], sin = (Tensor)vars[2], positions = (Tensor)vars[3];
            var call = (LayerCall)vars[4];
            if (call.Offload)
            {
                var host = empty(x.shape, x.dtype, CPU);
                if (x.device_type == DeviceType.CUDA) host = host.pin_memory();
                host.copy_(x, true);   // non-blocking
                ctx.save_data("host", new HostCopy(host.DetachFromDisposeScope(), x.device));
                ctx.save_for_backward([cos, sin, positions]);
            }
            else ctx.save_for_backward([x, cos, sin, positions]);
            ctx.save_data("call", call);
            manual_seed(call.Seed);
            var y = call.Layer.Forward(x, new RotaryTables(cos, sin, call.Theta, positions), call.Inputs);
            LeanAutograd.Remember(ctx, y);
            VlmTune.Diagnostics.MemoryTrace.Mark($"layer {call.Layer.Index} forward");
            return y;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            var saved = ctx.get_saved_variables();
            var call = (LayerCall)ctx.get_data("call");
            var host = call.Offload ? (HostCopy)ctx.get_data("host") : null;
            Tensor gradX;
            using (var scope = NewDisposeScope())
            {
                using (enable_grad())
                {
                    manual_seed(call.Seed);   // the same dropout masks as the forward pass
                    var x = (host is null ? saved[0].detach() : host.Value.to(host.Device, non_blocking: true)).requires_grad_(true);
                    host?.Value.Dispose();
                    int t = host is null ? 1 : 0;   // saved: [x,] cos, sin, positions
                    var y = call.Layer.Forward(x, new RotaryTables(saved[t], saved[t + 1], call.Theta, saved[t + 2]), call.Inputs);
                    VlmTune.Diagnostics.MemoryTrace.Mark($"layer {call.Layer.Index} recompute");
                    y.backward([gradOutput]);
                    VlmTune.Diagnostics.MemoryTrace.Mark($"layer {call.Layer.Index} backward");
                    gradX = x.grad!.detach().MoveToOuterDisposeScope();
                }
            }
            // Our handles only: the engine keeps its own references. Left to the GC, they held gigabytes at a time.
            gradOutput.Dispose();
            BackwardScratch.Keep(gradX);
            foreach (var t in saved) t.Dispose();
            call.BackwardDone?.Invoke(call.Layer.Index);
            return [gradX, null!, null!, null!, null!];
        }
    }
}

/// <summary>
/// Seeds for dropout (LoRA dropout) that depend only on the step, micro-batch and layer: a recomputed layer draws the
/// same masks as its first pass, and a resumed run the same masks as an uninterrupted one.
/// </summary>
public sealed class DropoutSeeds(long baseSeed)
{
    private long _micro;

    /// <summary>Called before each micro-batch's forward pass.</summary>
    public void StartMicroBatch(long globalMicroIndex) => _micro = globalMicroIndex;

    public long ForLayer(int layer) => Mix(baseSeed, _micro, layer + 1);

    public long ForMicroBatch() => Mix(baseSeed, _micro, 0);

    private static long Mix(long a, long b, long c)
    {
        ulong h = 1469598103934665603UL;
        foreach (var v in new[] { a, b, c })
        {
            h ^= (ulong)v;
            h *= 1099511628211UL;
            h ^= h >> 29;
        }
        return (long)(h & 0x7FFF_FFFF_FFFF);
    }
}
