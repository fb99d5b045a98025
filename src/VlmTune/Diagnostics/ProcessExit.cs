using System.Runtime.InteropServices;

namespace VlmTune.Diagnostics;

/// <summary>
/// Ends the process at once (libc <c>_exit</c>): no finalizers, no waiting for threads stuck in native calls (a CUDA
/// wait, an NCCL collective), as a crash would end it.
/// </summary>
public static partial class ProcessExit
{
    public static void Now(int code) => _exit(code);

    [LibraryImport("libc")]
    private static partial void _exit(int status);
}
