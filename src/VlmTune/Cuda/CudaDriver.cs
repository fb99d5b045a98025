using System.Runtime.InteropServices;

namespace VlmTune.Cuda;

/// <summary>
/// The CUDA driver API (libcuda.so.1), loaded at run time: just what launching our own kernels on the context and
/// stream TorchSharp uses needs. Kernels go to stream 0, the legacy default stream PyTorch's ops run on, so they are
/// ordered with TorchSharp's work without any synchronisation.
/// </summary>
public sealed unsafe class CudaDriver
{
    public const string FileName = "libcuda.so.1";

    private static readonly object Gate = new();
    private static CudaDriver? _instance;

    public string Path { get; }

    private readonly delegate* unmanaged<uint, int> _init;
    private readonly delegate* unmanaged<int*, int, int> _deviceGet;
    private readonly delegate* unmanaged<int*, int, int, int> _deviceGetAttribute;
    private readonly delegate* unmanaged<IntPtr*, int, int> _primaryCtxRetain;
    private readonly delegate* unmanaged<IntPtr*, int> _ctxGetCurrent;
    private readonly delegate* unmanaged<IntPtr, int> _ctxSetCurrent;
    private readonly delegate* unmanaged<IntPtr*, void*, int> _moduleLoadData;
    private readonly delegate* unmanaged<IntPtr*, IntPtr, byte*, int> _moduleGetFunction;
    private readonly delegate* unmanaged<IntPtr, uint, uint, uint, uint, uint, uint, uint, IntPtr, void**, void**, int> _launchKernel;
    private readonly delegate* unmanaged<IntPtr, int, int, int> _funcSetAttribute;
    private readonly delegate* unmanaged<int, byte**, int> _getErrorName;
    private readonly delegate* unmanaged<int, byte**, int> _getErrorString;
    private readonly delegate* unmanaged<IntPtr*, uint, int> _streamCreate;
    private readonly delegate* unmanaged<IntPtr*, uint, int> _eventCreate;
    private readonly delegate* unmanaged<IntPtr, IntPtr, int> _eventRecord;
    private readonly delegate* unmanaged<IntPtr, IntPtr, uint, int> _streamWaitEvent;
    // CUDA graphs (CUDA 11.4+): optional, null on older drivers.
    private readonly delegate* unmanaged<IntPtr, int, int> _streamBeginCapture;
    private readonly delegate* unmanaged<IntPtr, IntPtr*, int> _streamEndCapture;
    private readonly delegate* unmanaged<IntPtr*, IntPtr, ulong, int> _graphInstantiate;
    private readonly delegate* unmanaged<IntPtr, IntPtr, int> _graphLaunch;
    private readonly delegate* unmanaged<IntPtr, int> _graphExecDestroy;
    private readonly delegate* unmanaged<IntPtr, int> _graphDestroy;
    // Stream-ordered allocator (CUDA 11.2+): optional, null on older drivers.
    private readonly delegate* unmanaged<IntPtr*, int, int> _deviceGetDefaultMemPool;
    private readonly delegate* unmanaged<IntPtr, int, void*, int> _memPoolGetAttribute;
    private readonly delegate* unmanaged<IntPtr, int, void*, int> _memPoolSetAttribute;

    private readonly IntPtr[] _contexts = new IntPtr[64];

    private CudaDriver(string path, IntPtr handle)
    {
        Path = path;
        IntPtr Export(string name) => NativeLibrary.TryGetExport(handle, name, out var p) ? p
            : throw new CudaException($"{path} has no symbol {name}: a CUDA driver of version 11 or later is needed.");
        _init = (delegate* unmanaged<uint, int>)Export("cuInit");
        _deviceGet = (delegate* unmanaged<int*, int, int>)Export("cuDeviceGet");
        _deviceGetAttribute = (delegate* unmanaged<int*, int, int, int>)Export("cuDeviceGetAttribute");
        _primaryCtxRetain = (delegate* unmanaged<IntPtr*, int, int>)Export("cuDevicePrimaryCtxRetain");
        _ctxGetCurrent = (delegate* unmanaged<IntPtr*, int>)Export("cuCtxGetCurrent");
        _ctxSetCurrent = (delegate* unmanaged<IntPtr, int>)Export("cuCtxSetCurrent");
        _moduleLoadData = (delegate* unmanaged<IntPtr*, void*, int>)Export("cuModuleLoadData");
        _moduleGetFunction = (delegate* unmanaged<IntPtr*, IntPtr, byte*, int>)Export("cuModuleGetFunction");
        _launchKernel = (delegate* unmanaged<IntPtr, uint, uint, uint, uint, uint, uint, uint, IntPtr, void**, void**, int>)Export("cuLaunchKernel");
        _funcSetAttribute = (delegate* unmanaged<IntPtr, int, int, int>)Export("cuFuncSetAttribute");
        _getErrorName = (delegate* unmanaged<int, byte**, int>)Export("cuGetErrorName");
        _getErrorString = (delegate* unmanaged<int, byte**, int>)Export("cuGetErrorString");
        _streamCreate = (delegate* unmanaged<IntPtr*, uint, int>)Export("cuStreamCreate");
        _eventCreate = (delegate* unmanaged<IntPtr*, uint, int>)Export("cuEventCreate");
        _eventRecord = (delegate* unmanaged<IntPtr, IntPtr, int>)Export("cuEventRecord");
        _streamWaitEvent = (delegate* unmanaged<IntPtr, IntPtr, uint, int>)Export("cuStreamWaitEvent");
        IntPtr Optional(string name) => NativeLibrary.TryGetExport(handle, name, out var p) ? p : IntPtr.Zero;
        _deviceGetDefaultMemPool = (delegate* unmanaged<IntPtr*, int, int>)Optional("cuDeviceGetDefaultMemPool");
        _memPoolGetAttribute = (delegate* unmanaged<IntPtr, int, void*, int>)Optional("cuMemPoolGetAttribute");
        _memPoolSetAttribute = (delegate* unmanaged<IntPtr, int, void*, int>)Optional("cuMemPoolSetAttribute");
        _streamBeginCapture = (delegate* unmanaged<IntPtr, int, int>)Optional("cuStreamBeginCapture_v2");
        _streamEndCapture = (delegate* unmanaged<IntPtr, IntPtr*, int>)Optional("cuStreamEndCapture");
        _graphInstantiate = (delegate* unmanaged<IntPtr*, IntPtr, ulong, int>)Optional("cuGraphInstantiateWithFlags");
        _graphLaunch = (delegate* unmanaged<IntPtr, IntPtr, int>)Optional("cuGraphLaunch");
        _graphExecDestroy = (delegate* unmanaged<IntPtr, int>)Optional("cuGraphExecDestroy");
        _graphDestroy = (delegate* unmanaged<IntPtr, int>)Optional("cuGraphDestroy");
        Check(_init(0), "cuInit");
    }

    /// <summary>Where libcuda.so.1 usually is (the driver package's folders; containers mount it under /usr/local/nvidia).</summary>
    public static IReadOnlyList<string> DefaultSearchDirectories(string? ldLibraryPath = null)
    {
        var dirs = (ldLibraryPath ?? Environment.GetEnvironmentVariable("LD_LIBRARY_PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries).ToList();
        dirs.AddRange(["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/nvidia/lib64", "/usr/lib/wsl/lib", "/usr/local/cuda/compat"]);
        return dirs.Distinct().ToList();
    }

    /// <summary>The process-wide driver binding (loaded and cuInit'ed once).</summary>
    public static CudaDriver Shared
    {
        get
        {
            lock (Gate) return _instance ??= Load();
        }
    }

    public static CudaDriver Load(IEnumerable<string>? searchDirectories = null, bool trySystemLoader = true)
    {
        // The system loader first: libcuda must match the kernel driver, and ldconfig knows the installed one.
        var tried = new List<string>();
        if (trySystemLoader)
        {
            tried.Add($"{FileName} (system loader)");
            if (NativeLibrary.TryLoad(FileName, out var h)) return new CudaDriver(FileName, h);
        }
        foreach (var dir in searchDirectories ?? DefaultSearchDirectories())
        {
            var path = System.IO.Path.Combine(dir, FileName);
            tried.Add(path);
            if (File.Exists(path) && NativeLibrary.TryLoad(path, out var handle)) return new CudaDriver(path, handle);
        }
        throw new CudaException($"The CUDA driver ({FileName}) was not found; fused CUDA decoding needs it. Looked in:\n  " +
            string.Join("\n  ", tried) + "\nInstall the NVIDIA driver, or add the folder holding libcuda.so.1 to LD_LIBRARY_PATH.");
    }

    /// <summary>(major, minor) compute capability of device <paramref name="ordinal"/>.</summary>
    public (int Major, int Minor) ComputeCapability(int ordinal)
    {
        int dev, major, minor;
        Check(_deviceGet(&dev, ordinal), "cuDeviceGet");
        Check(_deviceGetAttribute(&major, 75, dev), "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)");
        Check(_deviceGetAttribute(&minor, 76, dev), "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)");
        return (major, minor);
    }

    /// <summary>
    /// Makes device <paramref name="ordinal"/>'s primary context (the one the CUDA runtime, hence TorchSharp, uses)
    /// current on this thread, unless a context already is.
    /// </summary>
    public void UsePrimaryContext(int ordinal)
    {
        IntPtr current;
        Check(_ctxGetCurrent(&current), "cuCtxGetCurrent");
        IntPtr primary = _contexts[ordinal];
        if (primary == IntPtr.Zero)
        {
            int dev;
            Check(_deviceGet(&dev, ordinal), "cuDeviceGet");
            Check(_primaryCtxRetain(&primary, dev), "cuDevicePrimaryCtxRetain");
            _contexts[ordinal] = primary;
        }
        if (current != primary) Check(_ctxSetCurrent(primary), "cuCtxSetCurrent");
    }

    public IntPtr LoadModule(byte[] image)
    {
        IntPtr module;
        fixed (byte* p = image) Check(_moduleLoadData(&module, p), "cuModuleLoadData");
        return module;
    }

    public IntPtr GetFunction(IntPtr module, string name)
    {
        IntPtr f;
        var bytes = System.Text.Encoding.ASCII.GetBytes(name + "\0");
        fixed (byte* p = bytes) Check(_moduleGetFunction(&f, module, p), $"cuModuleGetFunction({name})");
        return f;
    }

    /// <summary>Allows a kernel more than 48 KB of dynamic shared memory (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES).</summary>
    public void SetMaxDynamicSharedMemory(IntPtr function, int bytes) =>
        Check(_funcSetAttribute(function, 8, bytes), "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)");

    /// <summary>
    /// Launches on stream 0. Each argument is one 8-byte slot holding a pointer, an int (low 4 bytes) or a float's bits
    /// (low 4 bytes); the driver reads each parameter's size from the kernel's signature.
    /// </summary>
    public void Launch(IntPtr function, (uint X, uint Y, uint Z) grid, uint block, uint sharedBytes, ReadOnlySpan<long> args) =>
        Launch(function, grid, block, sharedBytes, args, DefaultStream);

    /// <summary>Launches on <paramref name="stream"/> (see the other overload for the arguments).</summary>
    public void Launch(IntPtr function, (uint X, uint Y, uint Z) grid, uint block, uint sharedBytes, ReadOnlySpan<long> args, IntPtr stream)
    {
        void** pointers = stackalloc void*[args.Length];
        fixed (long* a = args)
        {
            for (int i = 0; i < args.Length; i++) pointers[i] = a + i;
            int r = _launchKernel(function, grid.X, grid.Y, grid.Z, block, 1, 1, sharedBytes, stream, pointers, null);
            if (r != 0) Check(r, "cuLaunchKernel");
        }
    }

    /// <summary>Whether this driver can capture and replay CUDA graphs (CUDA 11.4+).</summary>
    public bool SupportsGraphs => _streamBeginCapture != null && _streamEndCapture != null && _graphInstantiate != null
        && _graphLaunch != null && _graphExecDestroy != null && _graphDestroy != null;

    /// <summary>
    /// Records what <paramref name="enqueue"/> launches on <paramref name="stream"/> (a created stream: the legacy
    /// default stream cannot be captured) into an executable graph, without running it. Relaxed capture mode: other
    /// threads' CUDA calls (TorchSharp's allocator) are not refused meanwhile.
    /// </summary>
    public IntPtr CaptureGraph(IntPtr stream, Action enqueue)
    {
        if (!SupportsGraphs) throw new CudaException("this CUDA driver has no graph API (CUDA 11.4 or later is needed)");
        Check(_streamBeginCapture(stream, 2 /* CU_STREAM_CAPTURE_MODE_RELAXED */), "cuStreamBeginCapture");
        IntPtr graph = IntPtr.Zero;
        try { enqueue(); }
        catch
        {
            // End the capture, or the stream stays capturing; what it recorded is dropped.
            _streamEndCapture(stream, &graph);
            if (graph != IntPtr.Zero) _graphDestroy(graph);
            throw;
        }
        Check(_streamEndCapture(stream, &graph), "cuStreamEndCapture");
        try
        {
            IntPtr exec;
            Check(_graphInstantiate(&exec, graph, 0), "cuGraphInstantiateWithFlags");
            return exec;
        }
        finally { _graphDestroy(graph); }   // the executable graph is independent of the one it was made from
    }

    public void LaunchGraph(IntPtr exec, IntPtr stream) => Check(_graphLaunch(exec, stream), "cuGraphLaunch");

    public void DestroyGraph(IntPtr exec) => Check(_graphExecDestroy(exec), "cuGraphExecDestroy");

    /// <summary>The legacy default stream, where TorchSharp's kernels, ours and (given stream 0) NCCL's run.</summary>
    public static IntPtr DefaultStream => IntPtr.Zero;

    /// <summary>
    /// A stream that does not implicitly wait for the legacy default stream (CU_STREAM_NON_BLOCKING), for work that
    /// should run beside TorchSharp's kernels, e.g. gradient all-reduces; every hand-over is then an explicit event.
    /// </summary>
    public IntPtr CreateNonBlockingStream()
    {
        IntPtr stream;
        Check(_streamCreate(&stream, 1), "cuStreamCreate");
        return stream;
    }

    public IntPtr CreateEvent()
    {
        IntPtr e;
        Check(_eventCreate(&e, 2 /* CU_EVENT_DISABLE_TIMING */), "cuEventCreate");
        return e;
    }

    /// <summary>Work queued on <paramref name="waiter"/> from now on starts after what <paramref name="producer"/> has queued so far.</summary>
    public void Order(IntPtr producer, IntPtr waiter, IntPtr scratchEvent)
    {
        Check(_eventRecord(scratchEvent, producer), "cuEventRecord");
        Check(_streamWaitEvent(waiter, scratchEvent, 0), "cuStreamWaitEvent");
    }

    /// <summary>CUmemPool_attribute values used here.</summary>
    public enum MemoryPoolAttribute
    {
        ReservedMemCurrent = 5, ReservedMemHigh = 6, UsedMemCurrent = 7, UsedMemHigh = 8,
    }

    /// <summary>
    /// Device <paramref name="ordinal"/>'s default memory pool: the one cudaMallocAsync allocates from, hence PyTorch's
    /// caching allocator under PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync. Null where the driver predates pools.
    /// </summary>
    public IntPtr? DefaultMemoryPool(int ordinal)
    {
        if (_deviceGetDefaultMemPool == null || _memPoolGetAttribute == null) return null;
        int dev;
        IntPtr pool;
        Check(_deviceGet(&dev, ordinal), "cuDeviceGet");
        return _deviceGetDefaultMemPool(&pool, dev) == 0 ? pool : null;
    }

    public ulong GetAttribute(IntPtr pool, MemoryPoolAttribute attribute)
    {
        ulong value;
        Check(_memPoolGetAttribute(pool, (int)attribute, &value), $"cuMemPoolGetAttribute({attribute})");
        return value;
    }

    /// <summary>Resets a high-water mark (the driver accepts only 0 for them).</summary>
    public void ResetHighWater(IntPtr pool, MemoryPoolAttribute attribute)
    {
        ulong zero = 0;
        Check(_memPoolSetAttribute(pool, (int)attribute, &zero), $"cuMemPoolSetAttribute({attribute})");
    }

    /// <summary>A float's bits in the low half of an argument slot.</summary>
    public static long Arg(float value) => (uint)BitConverter.SingleToInt32Bits(value);

    public void Check(int result, string call)
    {
        if (result == 0) return;
        byte* name = null, text = null;
        _getErrorName(result, &name);
        _getErrorString(result, &text);
        throw new CudaException($"{call} failed: {(name == null ? $"CUresult {result}" : Marshal.PtrToStringUTF8((IntPtr)name))}: " +
            (text == null ? "" : Marshal.PtrToStringUTF8((IntPtr)text)));
    }
}
