using System.Collections.Concurrent;
using System.Reflection;
using System.Runtime.InteropServices;
using System.Text;

namespace VlmTune.Cuda;

/// <summary>
/// NVRTC (libnvrtc.so.*), loaded at run time, compiling CUDA C to a cubin for the device's exact architecture. A cubin
/// (not PTX) loads on any driver that supports the GPU, even one older than this NVRTC.
/// </summary>
public sealed unsafe class Nvrtc
{
    public const string Stem = "libnvrtc.so";

    private static readonly object Gate = new();
    private static Nvrtc? _instance;

    public string Path { get; }
    public (int Major, int Minor) Version { get; }

    private readonly delegate* unmanaged<IntPtr*, byte*, byte*, int, byte**, byte**, int> _createProgram;
    private readonly delegate* unmanaged<IntPtr, int, byte**, int> _compileProgram;
    private readonly delegate* unmanaged<IntPtr, nuint*, int> _getProgramLogSize;
    private readonly delegate* unmanaged<IntPtr, byte*, int> _getProgramLog;
    private readonly delegate* unmanaged<IntPtr, nuint*, int> _getCubinSize;
    private readonly delegate* unmanaged<IntPtr, byte*, int> _getCubin;
    private readonly delegate* unmanaged<IntPtr*, int> _destroyProgram;
    private readonly delegate* unmanaged<int, IntPtr> _getErrorString;

    private Nvrtc(string path, IntPtr handle)
    {
        Path = path;
        IntPtr Export(string name) => NativeLibrary.TryGetExport(handle, name, out var p) ? p
            : throw new CudaException($"{path} has no symbol {name}: NVRTC 11.1 or later is needed.");
        var version = (delegate* unmanaged<int*, int*, int>)Export("nvrtcVersion");
        _createProgram = (delegate* unmanaged<IntPtr*, byte*, byte*, int, byte**, byte**, int>)Export("nvrtcCreateProgram");
        _compileProgram = (delegate* unmanaged<IntPtr, int, byte**, int>)Export("nvrtcCompileProgram");
        _getProgramLogSize = (delegate* unmanaged<IntPtr, nuint*, int>)Export("nvrtcGetProgramLogSize");
        _getProgramLog = (delegate* unmanaged<IntPtr, byte*, int>)Export("nvrtcGetProgramLog");
        _getCubinSize = (delegate* unmanaged<IntPtr, nuint*, int>)Export("nvrtcGetCUBINSize");
        _getCubin = (delegate* unmanaged<IntPtr, byte*, int>)Export("nvrtcGetCUBIN");
        _destroyProgram = (delegate* unmanaged<IntPtr*, int>)Export("nvrtcDestroyProgram");
        _getErrorString = (delegate* unmanaged<int, IntPtr>)Export("nvrtcGetErrorString");
        int major, minor;
        Check(version(&major, &minor), "nvrtcVersion");
        Version = (major, minor);
    }

    /// <summary>Where NVRTC usually is; PyTorch's CUDA wheels ship it as nvidia/cuda_nvrtc/lib (cu12) or nvidia/cu13/lib.</summary>
    public static IReadOnlyList<string> DefaultSearchDirectories(string? ldLibraryPath = null) =>
        NativeSearch.DefaultDirectories("cuda_nvrtc", ldLibraryPath);

    public static Nvrtc Shared
    {
        get
        {
            lock (Gate) return _instance ??= Load();
        }
    }

    public static Nvrtc Load(IEnumerable<string>? searchDirectories = null, bool trySystemLoader = true)
    {
        var dirs = (searchDirectories ?? DefaultSearchDirectories()).ToList();
        var (path, handle) = NativeSearch.Load("NVRTC", Stem, dirs,
            trySystemLoader ? ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2", "libnvrtc.so"] : [],
            "Fused CUDA decoding compiles its kernels with NVRTC: install a CUDA build of PyTorch (its wheels ship " +
            "nvidia/cuda_nvrtc or nvidia/cu13) or the CUDA toolkit, and add the folder to LD_LIBRARY_PATH; " +
            $"or set {RuntimeSwitches.FusedDecodeVariable}=0 to decode with TorchSharp ops only.");
        // NVRTC dlopens its builtins library by name at compile time: load the one beside it first so that lookup
        // finds it already loaded even when its folder is not on LD_LIBRARY_PATH.
        var dir = System.IO.Path.GetDirectoryName(path);
        if (!string.IsNullOrEmpty(dir))
            foreach (var builtins in NativeSearch.Versions(dir, "libnvrtc-builtins.so"))
                if (NativeLibrary.TryLoad(builtins, out _)) break;
        return new Nvrtc(path, handle);
    }

    /// <summary>Compiles <paramref name="source"/> to a cubin for sm_XY; a compile error throws with NVRTC's log.</summary>
    public byte[] CompileCubin(string source, string name, (int Major, int Minor) arch, IEnumerable<string> options)
    {
        var opts = new List<string> { $"--gpu-architecture=sm_{arch.Major}{arch.Minor}", "--std=c++17" };
        opts.AddRange(options);
        IntPtr prog;
        var src = Encoding.UTF8.GetBytes(source + "\0");
        var nameBytes = Encoding.UTF8.GetBytes(name + "\0");
        fixed (byte* s = src, n = nameBytes) Check(_createProgram(&prog, s, n, 0, null, null), "nvrtcCreateProgram");
        try
        {
            var handles = opts.Select(o => GCHandle.Alloc(Encoding.UTF8.GetBytes(o + "\0"), GCHandleType.Pinned)).ToArray();
            int result;
            try
            {
                byte** ptrs = stackalloc byte*[handles.Length];
                for (int i = 0; i < handles.Length; i++) ptrs[i] = (byte*)handles[i].AddrOfPinnedObject();
                result = _compileProgram(prog, handles.Length, ptrs);
            }
            finally { foreach (var h in handles) h.Free(); }
            if (result != 0)
                throw new CudaException($"NVRTC {Version.Major}.{Version.Minor} could not compile {name} for sm_{arch.Major}{arch.Minor} " +
                    $"({ErrorString(result)}) with options {string.Join(' ', opts)}:\n{Log(prog)}");
            nuint size;
            Check(_getCubinSize(prog, &size), "nvrtcGetCUBINSize");
            var cubin = new byte[(int)size];
            fixed (byte* c = cubin) Check(_getCubin(prog, c), "nvrtcGetCUBIN");
            return cubin;
        }
        finally { _destroyProgram(&prog); }
    }

    private string Log(IntPtr prog)
    {
        nuint size;
        if (_getProgramLogSize(prog, &size) != 0 || size == 0) return "(no log)";
        var log = new byte[(int)size];
        fixed (byte* l = log) _getProgramLog(prog, l);
        return Encoding.UTF8.GetString(log).TrimEnd('\0', '\n');
    }

    private string ErrorString(int result) => Marshal.PtrToStringUTF8(_getErrorString(result)) ?? $"nvrtcResult {result}";

    private void Check(int result, string call)
    {
        if (result != 0) throw new CudaException($"{call} failed: {ErrorString(result)}");
    }
}

/// <summary>CUDA C sources embedded in this assembly (src/VlmTune/Cuda/Kernels/*.cu).</summary>
public static class KernelSources
{
    public static string Read(string fileName)
    {
        var assembly = typeof(KernelSources).Assembly;
        var resource = assembly.GetManifestResourceNames().FirstOrDefault(n => n.EndsWith("." + fileName, StringComparison.Ordinal))
            ?? throw new CudaException($"Kernel source {fileName} is not embedded in {assembly.GetName().Name}.");
        using var stream = assembly.GetManifestResourceStream(resource)!;
        using var reader = new StreamReader(stream);
        return reader.ReadToEnd();
    }
}

/// <summary>
/// A compiled, loaded kernel module. Compiled once per process for each (source, architecture, defines); later
/// requests get the cached module.
/// </summary>
public sealed class KernelModule
{
    private static readonly ConcurrentDictionary<string, Lazy<KernelModule>> Cache = new();
    private readonly ConcurrentDictionary<string, IntPtr> _functions = new();
    private readonly IntPtr _module;

    public CudaDriver Driver { get; }
    public string Key { get; }

    private KernelModule(CudaDriver driver, IntPtr module, string key) { Driver = driver; _module = module; Key = key; }

    public static KernelModule Get(string sourceFile, int deviceOrdinal, IReadOnlyDictionary<string, int> defines)
    {
        var driver = CudaDriver.Shared;
        driver.UsePrimaryContext(deviceOrdinal);
        var arch = driver.ComputeCapability(deviceOrdinal);
        var options = defines.OrderBy(d => d.Key, StringComparer.Ordinal).Select(d => $"-D{d.Key}={d.Value}").ToList();
        string key = $"{sourceFile}|dev{deviceOrdinal}|sm_{arch.Major}{arch.Minor}|{string.Join(' ', options)}";
        return Cache.GetOrAdd(key, k => new Lazy<KernelModule>(() =>
        {
            var cubin = Nvrtc.Shared.CompileCubin(KernelSources.Read(sourceFile), sourceFile, arch, options);
            return new KernelModule(driver, driver.LoadModule(cubin), k);
        })).Value;
    }

    public IntPtr Function(string name) => _functions.GetOrAdd(name, n => Driver.GetFunction(_module, n));
}
