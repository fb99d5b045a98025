using TorchSharp;
using VlmTune.Autograd;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Training;

/// <summary>
/// Mean next-token cross-entropy over supervised tokens, as HF computes it (logits[:-1] against labels[1:], -100
/// ignored), in fp32. Only supervised positions go through the output head, a chunk at a time, and the backward pass
/// recomputes each chunk's logits: the [tokens × vocab] logits are never held whole, in the forward or the backward.
/// </summary>
public static class CausalLmLoss
{
    public const long IgnoreIndex = VlmTune.Text.ConversationTokenizer.IgnoreTokenId;

    /// <param name="hidden">(B, T, D) final hidden states.</param>
    /// <param name="labels">(B, T) labels aligned with the inputs (not shifted), -100 where not supervised.</param>
    /// <param name="chunkSize">Rows of logits computed at once.</param>
    /// <returns>The mean loss (fp32 scalar, differentiable) and the number of supervised tokens.</returns>
    public static (Tensor Loss, long Tokens) Compute(Tensor hidden, Tensor labels, Linear head, long chunkSize = 1024)
    {
        using var scope = NewDisposeScope();
        long d = hidden.shape[^1];
        var h = hidden[.., ..^1, ..].reshape(-1, d);                          // (N, D) positions that predict a next token
        var y = labels.to(hidden.device)[.., 1..].reshape(-1);                // (N)
        var rows = y.ne(IgnoreIndex).nonzero().squeeze(1);                    // (K)
        long k = rows.shape[0];
        if (k == 0)
            return ((hidden.sum() * 0).to_type(ScalarType.Float32).MoveToOuterDisposeScope(), 0);
        var hs = h.index_select(0, rows);                                     // (K, D)
        var ys = y.index_select(0, rows);                                     // (K)

        Tensor sum;
        if (is_grad_enabled() && hs.requires_grad)
            sum = ChunkedHeadCrossEntropy.apply(hs, ys, new HeadChunks(head, chunkSize));
        else if (is_grad_enabled() && head.parameters().Any(p => p.requires_grad))
            sum = DirectSum(hs, ys, head, chunkSize);     // only the head trains: the plain graph is the only way to reach it
        else
            using (no_grad()) sum = DirectSum(hs, ys, head, chunkSize);
        return ((sum / k).MoveToOuterDisposeScope(), k);
    }

    /// <summary>Sum of token losses of (K, D) rows, chunk by chunk, keeping whatever graph the caller's grad mode builds.</summary>
    internal static Tensor DirectSum(Tensor hs, Tensor ys, Linear head, long chunkSize)
    {
        Tensor? total = null;
        for (long start = 0; start < hs.shape[0]; start += chunkSize)
        {
            // A scope per chunk: each chunk's (chunk, V) logits are freed before the next (a graph keeps what it needs).
            using var chunkScope = NewDisposeScope();
            long end = Math.Min(start + chunkSize, hs.shape[0]);
            var logits = head.forward(hs.narrow(0, start, end - start)).to_type(ScalarType.Float32);    // (chunk, V)
            var part = nn.functional.cross_entropy(logits, ys.narrow(0, start, end - start), reduction: nn.Reduction.Sum);
            var next = total is null ? part : total + part;
            total?.Dispose();
            total = next.MoveToOuterDisposeScope();
        }
        return total!;
    }

    internal sealed record HeadChunks(Linear Head, long ChunkSize);

    /// <summary>Σ cross-entropy(head(h), y) whose backward recomputes each chunk's logits.</summary>
    internal sealed class ChunkedHeadCrossEntropy : autograd.SingleTensorFunction<ChunkedHeadCrossEntropy>
    {
        public override string Name => nameof(ChunkedHeadCrossEntropy);

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var hs = (Tensor)vars[0];
            var ys = (Tensor)vars[1];
            var chunks = (HeadChunks)vars[2];
            ctx.save_for_backward([hs, ys]);
            ctx.save_data("chunks", chunks);
            using var scope = NewDisposeScope();
            return DirectSum(hs, ys, chunks.Head, chunks.ChunkSize).MoveToOuterDisposeScope();
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            var saved = ctx.get_saved_variables();
            Tensor hs = saved[0], ys = saved[1];
            var chunks = (HeadChunks)ctx.get_data("chunks");
            Tensor gradHs;
            using (var scope = NewDisposeScope())
            {
                var grads = new List<Tensor>();
                using (enable_grad())
                {
                    for (long start = 0; start < hs.shape[0]; start += chunks.ChunkSize)
                    {
                        using var chunkScope = NewDisposeScope();   // frees this chunk's logits and their gradient before the next
                        long end = Math.Min(start + chunks.ChunkSize, hs.shape[0]);
                        var hc = hs.narrow(0, start, end - start).detach().requires_grad_(true);
                        var logits = chunks.Head.forward(hc).to_type(ScalarType.Float32);
                        var part = nn.functional.cross_entropy(logits, ys.narrow(0, start, end - start), reduction: nn.Reduction.Sum) * gradOutput;
                        // Re-entrant backward: accumulates the head's trainable weights (LoRA or full) and gives hc.grad.
                        part.backward();
                        grads.Add(hc.grad!.detach().MoveToOuterDisposeScope());
                    }
                }
                gradHs = cat(grads, 0).MoveToOuterDisposeScope();
            }
            BackwardScratch.Keep(gradHs);
            foreach (var t in saved) t.Dispose();
            return [gradHs, null!, null!];
        }
    }
}
