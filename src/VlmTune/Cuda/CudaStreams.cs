using System.Runtime.InteropServices;

namespace VlmTune.Cuda;

/// <summary>
/// The few CUDA driver API calls (libcuda.so.1, loaded at run time) that TorchSharp does not expose and data parallelism
/// needs: a second stream and events, so gradient all-reduces run beside the backward pass instead of after it.
/// TorchSharp's kernels run on the legacy default stream (stream 0); a stream created non-blocking does not implicitly
/// wait for it, so every hand-over is an explicit event: record on one stream, wait on the other.
/// </summary>
public sealed unsafe class CudaStreams
{
    public const string FileName = "libcuda.so.1";
    private const uint StreamNonBlocking = 1;   // CU_STREAM_NON_BLOCKING
    private const uint EventDisableTiming = 2;  // CU_EVENT_DISABLE_TIMING

    private readonly delegate* unmanaged<IntPtr*, uint, int> _streamCreate;
    private readonly delegate* unmanaged<IntPtr*, uint, int> _eventCreate;
    private readonly delegate* unmanaged<IntPtr, IntPtr, int> _eventRecord;
    private readonly delegate* unmanaged<IntPtr, IntPtr, uint, int> _streamWaitEvent;
    private readonly delegate* unmanaged<IntPtr, int> _streamSynchronize;
    private readonly delegate* unmanaged<IntPtr, int> _ctxSetCurrent;
    private readonly delegate* unmanaged<int, IntPtr*, int> _getErrorString;
    private readonly IntPtr _context;

    /// <summary>The legacy default stream, where TorchSharp's kernels (and NCCL calls given stream 0) run.</summary>
    public static IntPtr DefaultStream => IntPtr.Zero;

    private CudaStreams(IntPtr handle, int deviceOrdinal)
    {
        IntPtr Export(string name) => NativeLibrary.TryGetExport(handle, name, out var p) ? p
            : throw new VlmTuneException($"{FileName} has no symbol {name}: the NVIDIA driver is too old.");
        var init = (delegate* unmanaged<uint, int>)Export("cuInit");
        var deviceGet = (delegate* unmanaged<int*, int, int>)Export("cuDeviceGet");
        var retain = (delegate* unmanaged<IntPtr*, int, int>)Export("cuDevicePrimaryCtxRetain");
        _ctxSetCurrent = (delegate* unmanaged<IntPtr, int>)Export("cuCtxSetCurrent");
        _streamCreate = (delegate* unmanaged<IntPtr*, uint, int>)Export("cuStreamCreate");
        _eventCreate = (delegate* unmanaged<IntPtr*, uint, int>)Export("cuEventCreate");
        _eventRecord = (delegate* unmanaged<IntPtr, IntPtr, int>)Export("cuEventRecord");
        _streamWaitEvent = (delegate* unmanaged<IntPtr, IntPtr, uint, int>)Export("cuStreamWaitEvent");
        _streamSynchronize = (delegate* unmanaged<IntPtr, int>)Export("cuStreamSynchronize");
        _getErrorString = (delegate* unmanaged<int, IntPtr*, int>)Export("cuGetErrorString");
        Check(init(0), "cuInit");
        int device;
        Check(deviceGet(&device, deviceOrdinal), $"cuDeviceGet({deviceOrdinal})");
        IntPtr context;
        // The primary context is the one the CUDA runtime (and so libtorch) uses: streams made here interoperate with its kernels.
        Check(retain(&context, device), "cuDevicePrimaryCtxRetain");
        _context = context;
    }

    /// <summary>Loads the driver and binds to the primary context of visible device <paramref name="deviceOrdinal"/>.</summary>
    public static CudaStreams Load(int deviceOrdinal = 0)
    {
        if (!NativeLibrary.TryLoad(FileName, out var handle))
            throw new VlmTuneException($"the NVIDIA driver library ({FileName}) could not be loaded; CUDA streams need a GPU machine with the driver installed.");
        return new CudaStreams(handle, deviceOrdinal);
    }

    /// <summary>
    /// Makes the context current on the calling thread: autograd runs backward functions on its own threads, and driver
    /// calls from a thread without a current context fail.
    /// </summary>
    private void Bind() => Check(_ctxSetCurrent(_context), "cuCtxSetCurrent");

    public IntPtr CreateStream()
    {
        Bind();
        IntPtr stream;
        Check(_streamCreate(&stream, StreamNonBlocking), "cuStreamCreate");
        return stream;
    }

    public IntPtr CreateEvent()
    {
        Bind();
        IntPtr e;
        Check(_eventCreate(&e, EventDisableTiming), "cuEventCreate");
        return e;
    }

    /// <summary>Work queued on <paramref name="waiter"/> from now on starts only after what <paramref name="producer"/> has queued so far.</summary>
    public void Order(IntPtr producer, IntPtr waiter, IntPtr scratchEvent)
    {
        Bind();
        Check(_eventRecord(scratchEvent, producer), "cuEventRecord");
        Check(_streamWaitEvent(waiter, scratchEvent, 0), "cuStreamWaitEvent");
    }

    public void Synchronize(IntPtr stream)
    {
        Bind();
        Check(_streamSynchronize(stream), "cuStreamSynchronize");
    }

    private void Check(int result, string call)
    {
        if (result == 0) return;
        IntPtr text = IntPtr.Zero;
        string message = _getErrorString is not null && _getErrorString(result, &text) == 0 && text != IntPtr.Zero
            ? Marshal.PtrToStringUTF8(text) ?? "" : "";
        throw new VlmTuneException($"CUDA driver call {call} failed with error {result} {message}");
    }
}
