using VlmTune.Cuda;
using static TorchSharp.torch;

namespace VlmTune.Training;

/// <summary>
/// A device copy of a multi-tensor kernel's pointer rows and chunk plan (<see cref="FusedAdamW.PlanChunks"/>), rebuilt
/// only when a value moved (a resume replaces the state tensors, autograd may replace a gradient): usually every step
/// reuses it without a host-to-device copy. Shared by <see cref="FusedAdamW"/> and <see cref="FusedAdamW8bit"/>.
/// </summary>
internal sealed class KernelTable : IDisposable
{
    private readonly long[] _rows;
    private readonly Tensor _rowsOnDevice, _chunksOnDevice;
    public int Chunks { get; }
    public long RowsPointer => (long)TensorPointers.DataPointer(_rowsOnDevice);
    public long ChunksPointer => (long)TensorPointers.DataPointer(_chunksOnDevice);

    private KernelTable(long[] rows, long[] chunks, Device device)
    {
        _rows = rows;
        Chunks = chunks.Length / 2;
        _rowsOnDevice = tensor(rows).to(device).DetachFromDisposeScope();
        _chunksOnDevice = tensor(chunks.Length == 0 ? [0L, 0L] : chunks).to(device).DetachFromDisposeScope();
    }

    /// <param name="values">The rows one after the other, as the kernel reads them (pointers, then the element count).</param>
    /// <param name="counts">Each row's element count, for the chunk plan.</param>
    public static KernelTable Refresh(KernelTable? current, long[] values, IReadOnlyList<long> counts, Device device)
    {
        if (current is not null && current._rows.AsSpan().SequenceEqual(values)) return current;
        current?.Dispose();
        var chunks = FusedAdamW.PlanChunks(counts).SelectMany(c => new[] { (long)c.Tensor, c.Start }).ToArray();
        return new KernelTable(values, chunks, device);
    }

    public void Dispose()
    {
        _rowsOnDevice.Dispose();
        _chunksOnDevice.Dispose();
    }
}
