using static TorchSharp.torch;

namespace VlmTune.Models;

/// <summary>
/// The rotary position embedding every InternVL LLM uses (rotate_half pairing), with the linear and dynamic-NTK scalings
/// (InternLM2) and Phi-3's longrope (per-frequency factors, short or long by sequence length, cos/sin scaled).
/// Frequencies are computed the way the official code computes them (fp32 pow of a double base), so tables match bit for bit.
/// </summary>
public sealed class RotaryEmbedding(LlmConfig c)
{
    private readonly int _dim = c.HeadDim;

    /// <summary>
    /// Dynamic NTK picks its base from max(sequence length, this). The official module keeps the longest length it has
    /// seen (its cos/sin cache only grows), so a model that once ran a long prompt keeps the scaled base afterwards;
    /// set this to reproduce such a state. 0 (default): the base depends on the current sequence only.
    /// </summary>
    public long MinDynamicLength { get; set; }

    /// <summary>The RoPE base for a sequence of this many tokens (rope_theta unless dynamic NTK scales it).</summary>
    public double Theta(long sequenceLength)
    {
        double theta = c.RopeTheta;
        long length = Math.Max(sequenceLength, MinDynamicLength);
        if (c.RopeScaling is { Type: "dynamic", Factor: var f } && length > c.MaxPositionEmbeddings)
            theta *= Math.Pow(f * length / c.MaxPositionEmbeddings - (f - 1), _dim / (double)(_dim - 2));
        return theta;
    }

    public Tensor InvFreq(double theta, Device device, long sequenceLength = 0)
    {
        var exponents = arange(0, _dim, 2, ScalarType.Int64, device).to_type(ScalarType.Float32) / _dim;
        var powers = full_like(exponents, theta).pow(exponents);                               // (d/2)
        if (c.RopeScaling is { Type: "longrope" } longRope)
        {
            // Phi-3: 1 / (factor · base^(2i/d)), the long factors once the sequence outgrows the original context.
            var factors = UsesLongFactors(sequenceLength) ? longRope.LongFactor! : longRope.ShortFactor!;
            powers = tensor(factors.Select(x => (float)x).ToArray(), device: device) * powers;
        }
        return powers.reciprocal();
    }

    /// <summary>Phi-3 longrope: whether a pass over this many tokens takes the long factors (false: the short ones, or no longrope).</summary>
    public bool UsesLongFactors(long sequenceLength) => c.RopeScaling is { Type: "longrope" } && sequenceLength > c.OriginalMaxPositionEmbeddings;

    /// <summary>
    /// Phi-3 longrope's attention scaling of cos and sin: √(1 + ln(max / original) / ln(original)) when the model's
    /// context was extended, else 1. Applied in fp32 before the tables are rounded to the model dtype.
    /// </summary>
    public double CosSinScale()
    {
        if (c.RopeScaling is not { Type: "longrope" }) return 1;
        double scale = (double)c.MaxPositionEmbeddings / c.OriginalMaxPositionEmbeddings;
        return scale <= 1 ? 1 : Math.Sqrt(1 + Math.Log(scale) / Math.Log(c.OriginalMaxPositionEmbeddings));
    }

    /// <summary>cos/sin tables for (B, T) positions in a sequence of <paramref name="sequenceLength"/> tokens.</summary>
    public RotaryTables Tables(Tensor positions, long sequenceLength, ScalarType dtype)
    {
        double theta = Theta(sequenceLength);
        var invFreq = InvFreq(theta, positions.device, sequenceLength);
        var t = positions.to_type(ScalarType.Float32);
        if (c.RopeScaling is { Type: "linear", Factor: var f }) t = t / f;
        var freqs = t.unsqueeze(-1) * invFreq;                                                  // (B, T, d/2)
        var emb = cat([freqs, freqs], -1).unsqueeze(1);                                          // (B, 1, T, d)
        Tensor cos = emb.cos(), sin = emb.sin();
        if (CosSinScale() is var scale && scale != 1) { cos = cos * scale; sin = sin * scale; }
        return new RotaryTables(cos.to_type(dtype), sin.to_type(dtype), theta, positions);
    }
}

/// <summary>cos/sin of one pass, broadcast over heads: (B, 1, T, d); the base and (B, T) positions they came from.</summary>
public sealed record RotaryTables(Tensor Cos, Tensor Sin, double Theta, Tensor Positions)
{
    // x: (B, heads, T, d)
    public Tensor Apply(Tensor x)
    {
        using var scope = NewDisposeScope();   // the rotated half and both products are freed here
        return (x * Cos + RotateHalf(x) * Sin).MoveToOuterDisposeScope();
    }

    /// <summary>Rotates x (B, heads, S, d) at (B, S) positions from base <paramref name="from"/> to base <paramref name="to"/>.</summary>
    public static Tensor Rerotate(RotaryEmbedding rope, Tensor x, Tensor positions, double from, double to)
    {
        var delta = positions.to_type(ScalarType.Float32).unsqueeze(-1) * (rope.InvFreq(to, x.device) - rope.InvFreq(from, x.device));
        var emb = cat([delta, delta], -1).unsqueeze(1).to_type(x.dtype);                        // (B, 1, S, d)
        return x * emb.cos() + RotateHalf(x) * emb.sin();
    }

    public static Tensor RotateHalf(Tensor x)
    {
        long half = x.shape[^1] / 2;
        return cat([-x[TensorIndex.Ellipsis, TensorIndex.Slice(half)], x[TensorIndex.Ellipsis, TensorIndex.Slice(0, half)]], -1);
    }
}
