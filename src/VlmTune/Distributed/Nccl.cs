using System.Runtime.InteropServices;
using TorchSharp;
using VlmTune.Cuda;

namespace VlmTune.Distributed;

public enum NcclReduceOp { Sum = 0, Prod = 1, Max = 2, Min = 3, Avg = 4 }

/// <summary>
/// NCCL's C API (libnccl.so.2), loaded at run time. The library is found by explicit search rather than a
/// DllImport resolver (an assembly can have only one resolver) so that "NCCL is absent" is a clear
/// <see cref="DistributedException"/> listing where we looked, not a DllNotFoundException deep in training.
/// </summary>
public sealed unsafe class NcclLibrary
{
    public const string FileName = "libnccl.so.2";
    public const int UniqueIdBytes = 128; // NCCL_UNIQUE_ID_BYTES

    [StructLayout(LayoutKind.Sequential, Size = UniqueIdBytes)]
    internal struct UniqueId { public fixed byte Bytes[UniqueIdBytes]; }

    public string Path { get; }

    internal readonly delegate* unmanaged<UniqueId*, int> GetUniqueId;
    internal readonly delegate* unmanaged<IntPtr*, int, UniqueId, int, int> CommInitRank;
    internal readonly delegate* unmanaged<IntPtr, IntPtr, nuint, int, int, IntPtr, IntPtr, int> AllReduce;
    internal readonly delegate* unmanaged<IntPtr, IntPtr, nuint, int, int, IntPtr, IntPtr, int> Broadcast;
    internal readonly delegate* unmanaged<IntPtr, int> CommDestroy;
    internal readonly delegate* unmanaged<IntPtr, int> CommAbort;
    internal readonly delegate* unmanaged<IntPtr, int*, int> CommGetAsyncError;
    internal readonly delegate* unmanaged<int> GroupStart;
    internal readonly delegate* unmanaged<int> GroupEnd;
    private readonly delegate* unmanaged<int, IntPtr> _getErrorString;

    private NcclLibrary(string path, IntPtr handle)
    {
        Path = path;
        IntPtr Export(string name) => NativeLibrary.TryGetExport(handle, name, out var p) ? p
            : throw new DistributedException($"{path} has no symbol {name}: NCCL 2.x is needed.");
        GetUniqueId = (delegate* unmanaged<UniqueId*, int>)Export("ncclGetUniqueId");
        CommInitRank = (delegate* unmanaged<IntPtr*, int, UniqueId, int, int>)Export("ncclCommInitRank");
        AllReduce = (delegate* unmanaged<IntPtr, IntPtr, nuint, int, int, IntPtr, IntPtr, int>)Export("ncclAllReduce");
        Broadcast = (delegate* unmanaged<IntPtr, IntPtr, nuint, int, int, IntPtr, IntPtr, int>)Export("ncclBroadcast");
        CommDestroy = (delegate* unmanaged<IntPtr, int>)Export("ncclCommDestroy");
        CommAbort = (delegate* unmanaged<IntPtr, int>)Export("ncclCommAbort");
        CommGetAsyncError = (delegate* unmanaged<IntPtr, int*, int>)Export("ncclCommGetAsyncError");
        _getErrorString = (delegate* unmanaged<int, IntPtr>)Export("ncclGetErrorString");
        GroupStart = (delegate* unmanaged<int>)Export("ncclGroupStart");
        GroupEnd = (delegate* unmanaged<int>)Export("ncclGroupEnd");
    }

    /// <summary>
    /// Where NCCL usually is: the CUDA library search (LD_LIBRARY_PATH, beside this app, libtorch's folder and PyTorch's
    /// wheel layout site-packages/nvidia/nccl/lib next to site-packages/torch/lib, CUDA_HOME, system folders), plus the
    /// app's native runtimes folder.
    /// </summary>
    public static IReadOnlyList<string> DefaultSearchDirectories(string? ldLibraryPath = null) =>
        NativeSearch.DefaultDirectories("nccl", ldLibraryPath)
            .Append(System.IO.Path.Combine(AppContext.BaseDirectory, "runtimes", "linux-x64", "native"))
            .Distinct().ToList();

    /// <summary>
    /// Loads NCCL from the first of <paramref name="searchDirectories"/> holding it, else (when
    /// <paramref name="trySystemLoader"/>) by bare name through the system loader (ldconfig cache).
    /// </summary>
    public static NcclLibrary Load(IEnumerable<string>? searchDirectories = null, bool trySystemLoader = true)
    {
        var tried = new List<string>();
        foreach (var dir in searchDirectories ?? DefaultSearchDirectories())
        {
            var path = System.IO.Path.Combine(dir, FileName);
            tried.Add(path);
            if (File.Exists(path) && NativeLibrary.TryLoad(path, out var handle)) return new NcclLibrary(path, handle);
        }
        if (trySystemLoader)
        {
            tried.Add($"{FileName} (system loader)");
            if (NativeLibrary.TryLoad(FileName, out var handle)) return new NcclLibrary(FileName, handle);
        }
        throw new DistributedException(
            $"NCCL ({FileName}) was not found; multi-GPU training needs it. Looked in:\n  " + string.Join("\n  ", tried) +
            "\nInstall a CUDA build of PyTorch/libtorch (it ships NCCL) and add its lib folder to LD_LIBRARY_PATH.");
    }

    internal string ErrorString(int result)
    {
        var p = _getErrorString(result);
        return p == IntPtr.Zero ? "unknown error" : Marshal.PtrToStringUTF8(p) ?? "unknown error";
    }

    internal void Check(int result, string call)
    {
        if (result == 0) return;
        var name = result switch
        {
            1 => "ncclUnhandledCudaError", 2 => "ncclSystemError", 3 => "ncclInternalError", 4 => "ncclInvalidArgument",
            5 => "ncclInvalidUsage", 6 => "ncclRemoteError", 7 => "ncclInProgress", _ => $"nccl result {result}",
        };
        throw new DistributedException($"{call} failed: {name}: {ErrorString(result)}" +
            (result == 6 ? " (another rank failed or its connection dropped)" : ""));
    }

    /// <summary>A fresh 128-byte id; rank 0 makes it and the rendezvous broadcasts it.</summary>
    public byte[] NewUniqueId()
    {
        UniqueId id;
        Check(GetUniqueId(&id), "ncclGetUniqueId");
        return new ReadOnlySpan<byte>(id.Bytes, UniqueIdBytes).ToArray();
    }
}

/// <summary>
/// One rank's NCCL communicator. Collectives run on the CUDA legacy default stream (stream 0), the one TorchSharp
/// kernels use unless a stream is set, so they are ordered after the kernels that produced the tensor.
/// Every NCCL result code other than success becomes a <see cref="DistributedException"/>.
/// </summary>
public sealed unsafe class NcclCommunicator : IDisposable
{
    private readonly NcclLibrary _nccl;
    private IntPtr _comm;

    public int Rank { get; }
    public int WorldSize { get; }

    /// <summary>Joins the communicator; the caller has already selected this rank's GPU (LOCAL_RANK) as current device.</summary>
    public NcclCommunicator(NcclLibrary nccl, byte[] uniqueId, int rank, int worldSize)
    {
        ArgumentNullException.ThrowIfNull(nccl);
        if (uniqueId.Length != NcclLibrary.UniqueIdBytes)
            throw new ArgumentException($"an NCCL unique id has {NcclLibrary.UniqueIdBytes} bytes, got {uniqueId.Length}", nameof(uniqueId));
        _nccl = nccl; Rank = rank; WorldSize = worldSize;
        NcclLibrary.UniqueId id;
        uniqueId.CopyTo(new Span<byte>(id.Bytes, NcclLibrary.UniqueIdBytes));
        IntPtr comm;
        nccl.Check(nccl.CommInitRank(&comm, worldSize, id, rank), $"ncclCommInitRank(rank {rank} of {worldSize})");
        _comm = comm;
    }

    /// <summary>In-place all-reduce of a contiguous CUDA tensor, queued on <paramref name="stream"/> (default: stream 0).</summary>
    public void AllReduce(torch.Tensor tensor, NcclReduceOp op = NcclReduceOp.Sum, IntPtr stream = default)
    {
        var p = Buffer(tensor, "AllReduce");
        _nccl.Check(_nccl.AllReduce(p, p, (nuint)tensor.numel(), DataType(tensor.dtype), (int)op, Comm, stream), "ncclAllReduce");
    }

    /// <summary>In-place broadcast of <paramref name="root"/>'s tensor into every rank's tensor of the same shape.</summary>
    public void Broadcast(torch.Tensor tensor, int root, IntPtr stream = default)
    {
        if (root < 0 || root >= WorldSize) throw new ArgumentOutOfRangeException(nameof(root), root, $"must be in [0, {WorldSize})");
        var p = Buffer(tensor, "Broadcast");
        _nccl.Check(_nccl.Broadcast(p, p, (nuint)tensor.numel(), DataType(tensor.dtype), root, Comm, stream), "ncclBroadcast");
    }

    /// <summary>Collectives issued inside <paramref name="body"/> are launched together (one NCCL group): many small broadcasts cost one.</summary>
    public void Group(Action body)
    {
        _nccl.Check(_nccl.GroupStart(), "ncclGroupStart");
        try { body(); }
        finally { _nccl.Check(_nccl.GroupEnd(), "ncclGroupEnd"); }
    }

    /// <summary>Throws if NCCL reported an asynchronous failure (e.g. a peer died); poll while waiting on collectives.</summary>
    public void CheckAsyncError()
    {
        int error;
        _nccl.Check(_nccl.CommGetAsyncError(Comm, &error), "ncclCommGetAsyncError");
        _nccl.Check(error, "NCCL communicator (asynchronous error)");
    }

    /// <summary>Tears the communicator down without waiting for peers: the way out when another rank failed.</summary>
    public void Abort()
    {
        if (_comm == IntPtr.Zero) return;
        var comm = _comm;
        _comm = IntPtr.Zero;
        _nccl.Check(_nccl.CommAbort(comm), "ncclCommAbort");
    }

    public void Dispose()
    {
        if (_comm == IntPtr.Zero) return;
        var comm = _comm;
        _comm = IntPtr.Zero;
        _nccl.Check(_nccl.CommDestroy(comm), "ncclCommDestroy");
    }

    private IntPtr Comm => _comm != IntPtr.Zero ? _comm : throw new ObjectDisposedException(nameof(NcclCommunicator));

    private static IntPtr Buffer(torch.Tensor tensor, string op)
    {
        if (tensor.device_type != DeviceType.CUDA) throw new ArgumentException($"NCCL {op} needs a CUDA tensor, got {tensor.device}", nameof(tensor));
        if (!tensor.is_contiguous()) throw new ArgumentException($"NCCL {op} needs a contiguous tensor (flatten gradients into a bucket first)", nameof(tensor));
        return TensorPointers.DataPointer(tensor);
    }

    /// <summary>ncclDataType_t for a torch dtype.</summary>
    internal static int DataType(torch.ScalarType type) => type switch
    {
        torch.ScalarType.Int8 => 0, torch.ScalarType.Byte => 1, torch.ScalarType.Int32 => 2, torch.ScalarType.Int64 => 4,
        torch.ScalarType.Float16 => 6, torch.ScalarType.Float32 => 7, torch.ScalarType.Float64 => 8, torch.ScalarType.BFloat16 => 9,
        _ => throw new ArgumentException($"NCCL has no data type for {type}"),
    };
}
