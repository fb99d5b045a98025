using VlmTune.Gpu.Tests.Support;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Gpu.Tests;

/// <summary>
/// Packed rows' attention on CUDA (Attention.ComputePacked: the samples regrouped into one right-padded causal SDPA
/// call, flash on bf16) against each sample's own causal call: outputs and q/k/v gradients agree to bf16 rounding, and
/// a row's padding tail is zero with zero gradients.
/// </summary>
[Trait("Category", "Gpu")]
public class PackedAttentionTests
{
    [GpuTheory]
    [InlineData(AttentionKind.Sdpa)]
    [InlineData(AttentionKind.Exact)]
    public void PackedAttentionEqualsEachSampleAlone(AttentionKind kind)
    {
        using var scope = NewDisposeScope();
        int[][] lengths = [[300, 250, 7], [1, 480], [96]];
        const long t = 576, heads = 16, d = 128;
        using var rows = new PackedRows(lengths, t);
        manual_seed(5);
        Tensor Leaf() => randn(lengths.Length, heads, t, d, ScalarType.BFloat16, TestDevice.Cuda).requires_grad_();
        Tensor q = Leaf(), k = Leaf(), v = Leaf();
        var packed = Attention.ComputePacked(q, k, v, kind, rows);
        var weights = randn_like(packed);
        (packed.to_type(ScalarType.Float32) * weights.to_type(ScalarType.Float32)).sum().backward();
        Tensor gq = q.grad!.clone(), gk = k.grad!.clone(), gv = v.grad!.clone();

        for (int r = 0; r < lengths.Length; r++)
        {
            long at = 0;
            foreach (var length in lengths[r])
            {
                Tensor Slice(Tensor x) => Part(x.detach(), r, at, length).contiguous().requires_grad_();
                Tensor qs = Slice(q), ks = Slice(k), vs = Slice(v);
                var alone = Attention.Compute(qs, ks, vs, kind, causalOffset: 0, keyMask: null);
                (alone.to_type(ScalarType.Float32) * Part(weights, r, at, length).to_type(ScalarType.Float32)).sum().backward();
                string what = $"{kind}, row {r}, sample at {at} of {length} tokens";
                AssertClose(alone, Part(packed, r, at, length), $"{what}: output");
                AssertClose(qs.grad!, Part(gq, r, at, length), $"{what}: dq");
                AssertClose(ks.grad!, Part(gk, r, at, length), $"{what}: dk");
                AssertClose(vs.grad!, Part(gv, r, at, length), $"{what}: dv");
                at += length;
            }
            if (at < t)
            {
                Assert.Equal(0, Part(packed, r, at, t - at).abs().max().to_type(ScalarType.Float32).item<float>());
                foreach (var (g, name) in new[] { (gq, "dq"), (gk, "dk"), (gv, "dv") })
                    Assert.True(Part(g, r, at, t - at).abs().max().to_type(ScalarType.Float32).item<float>() == 0, $"{kind}, row {r}: {name} of the padding tail is not zero");
            }
        }
    }

    /// <summary>Row <paramref name="row"/>'s tokens [at, at + length): (1, H, length, d).</summary>
    private static Tensor Part(Tensor x, int row, long at, long length) => x.narrow(0, row, 1).narrow(2, at, length);

    /// <summary>bf16 outputs of two kernel choices: relative to the reference's scale, as bf16 keeps ~3 significant digits.</summary>
    private static void AssertClose(Tensor expected, Tensor actual, string what)
    {
        using var e = expected.to_type(ScalarType.Float32);
        using var a = actual.to_type(ScalarType.Float32);
        double scale = e.abs().max().item<float>() + 1e-6, diff = (e - a).abs().max().item<float>();
        Assert.True(diff <= 2e-2 * scale, $"{what}: max difference {diff} against a scale of {scale}");
    }
}
