using static TorchSharp.torch;

namespace VlmTune.Models;

/// <summary>
/// The layout of a batch of packed rows (sequence packing for training): each row holds whole samples back to back,
/// then padding up to the batch's row length. Positions restart at 0 with every sample and attention stays causal
/// within a sample, never crossing into another one or into the padding (<see cref="Attention.ComputePacked"/>), so a
/// packed sample's hidden states equal those it gets alone.
/// </summary>
public sealed class PackedRows : IDisposable
{
    private (Device Device, Tensor Gather, Tensor Scatter)? _attentionIndex;

    /// <param name="sampleLengths">Per row, the token count of each of its samples, in order.</param>
    /// <param name="rowLength">T, the length every row is padded to (≥ each row's total).</param>
    public PackedRows(IReadOnlyList<int[]> sampleLengths, long rowLength)
    {
        if (sampleLengths.Count == 0) throw new ArgumentException("packed rows need at least one row.", nameof(sampleLengths));
        for (int r = 0; r < sampleLengths.Count; r++)
        {
            if (sampleLengths[r].Length == 0 || sampleLengths[r].Any(l => l < 1))
                throw new ArgumentException($"row {r} must hold samples of at least one token each.", nameof(sampleLengths));
            if (sampleLengths[r].Sum(l => (long)l) > rowLength)
                throw new ArgumentException($"row {r} holds {sampleLengths[r].Sum()} tokens, more than the row length {rowLength}.", nameof(sampleLengths));
        }
        SampleLengths = sampleLengths;
        RowLength = rowLength;
        LongestSample = sampleLengths.Max(r => r.Max());
    }

    public IReadOnlyList<int[]> SampleLengths { get; }
    public int Rows => SampleLengths.Count;
    public long RowLength { get; }
    public int Samples => SampleLengths.Sum(r => r.Length);

    /// <summary>
    /// The longest sample. It decides the dynamic-NTK RoPE base, as the padded length (= the longest sample) does for an
    /// unpacked batch of the same samples and as XTuner's varlen attention passes max_seqlen: packing never changes it.
    /// </summary>
    public long LongestSample { get; }

    /// <summary>
    /// Index tensors on <paramref name="device"/> that regroup the rows' R·T token slots as samples for attention, made
    /// once per batch (every layer's forward and recompute reads them; one upload, not one host copy per layer):
    /// Gather (Samples · LongestSample): sample i's token j is row-slot Gather[i·L + j]; past a sample's end it repeats
    /// slot 0, a query whose output is dropped and a key that no real query sees, being after every real one.
    /// Scatter (R·T): where each row slot's output is among the Samples · L grouped ones; a row's padding tail points one
    /// past them, at a zero row.
    /// </summary>
    public (Tensor Gather, Tensor Scatter) AttentionIndex(Device device)
    {
        if (_attentionIndex is { } cached && cached.Device == device) return (cached.Gather, cached.Scatter);
        DisposeAttentionIndex();
        long grouped = Samples * LongestSample;
        var gather = new long[grouped];
        var scatter = new long[Rows * RowLength];
        Array.Fill(scatter, grouped);
        long sample = 0;
        for (int r = 0; r < Rows; r++)
        {
            long slot = r * RowLength;
            foreach (var length in SampleLengths[r])
            {
                for (long j = 0; j < length; j++, slot++)
                {
                    gather[sample * LongestSample + j] = slot;
                    scatter[slot] = sample * LongestSample + j;
                }
                sample++;
            }
        }
        var g = tensor(gather, device: device).DetachFromDisposeScope();
        var sc = tensor(scatter, device: device).DetachFromDisposeScope();
        _attentionIndex = (device, g, sc);
        return (g, sc);
    }

    public void Dispose() => DisposeAttentionIndex();

    private void DisposeAttentionIndex()
    {
        if (_attentionIndex is not { } cached) return;
        cached.Gather.Dispose(); cached.Scatter.Dispose();
        _attentionIndex = null;
    }

    /// <summary>(R, T) positions: 0..len-1 for each sample, 0.. again over a row's padding tail.</summary>
    public Tensor PositionIds(Device device)
    {
        var positions = new long[Rows * RowLength];
        for (int r = 0; r < Rows; r++)
        {
            long at = r * RowLength;
            foreach (var length in SampleLengths[r].Append((int)(RowLength - SampleLengths[r].Sum())))
                for (int j = 0; j < length; j++) positions[at++] = j;
        }
        return tensor(positions, [Rows, RowLength], device: device);
    }
}
