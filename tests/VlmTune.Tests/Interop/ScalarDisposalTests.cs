using System.Reflection;
using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace VlmTune.Tests.Interop;

/// <summary>
/// TorchSharp frees a Scalar through THSTorch_dispose_scalar, which the build (build/patch-libtorchsharp.sh) sends to
/// build/deferred-scalar-free.cc: the native Scalar stays readable for a few seconds after its finaliser or Dispose ran,
/// because TorchSharp hands libtorch Scalars that nothing keeps alive through the call (docs/torchsharp-scalar-race.md).
/// </summary>
public sealed class ScalarDisposalTests
{
    /// <summary>
    /// Freed at once (the unpatched library), glibc writes its free-list pointers over the tag and the value. Disposed
    /// through TorchSharp, so its P/Invoke is shown to bind to the replacement.
    /// </summary>
    [Fact]
    public void ADisposedScalarIsLeftIntactForAWhile()
    {
        var scalar = 1.5.ToScalar();
        var handle = (IntPtr)typeof(Scalar).GetProperty("Handle", BindingFlags.NonPublic | BindingFlags.Instance)!.GetValue(scalar)!;
        var before = new byte[24];
        Marshal.Copy(handle, before, 0, before.Length);
        scalar.Dispose();
        var after = new byte[24];
        Marshal.Copy(handle, after, 0, after.Length);
        Assert.Equal(before, after);
    }

    /// <summary>
    /// The failure as users met it: `t * 0.5` makes a Scalar that is garbage once its handle is read; with garbage
    /// collections on another thread, the unpatched library failed within 10k–50k products ("Expected false to be true
    /// ... toDouble"); the deferred free makes it unreachable.
    /// </summary>
    [Fact]
    public void ScalarTemporariesSurviveCollectionsOnAnotherThread()
    {
        using var t = ones(4);
        var stop = false;
        var collector = new Thread(() =>
        {
            while (!Volatile.Read(ref stop)) { GC.Collect(); GC.WaitForPendingFinalizers(); }
        });
        collector.Start();
        try
        {
            for (var round = 0; round < 150; round++)
            {
                using var scope = NewDisposeScope();
                for (var i = 0; i < 1000; i++) _ = t * 0.5;
            }
        }
        finally
        {
            Volatile.Write(ref stop, true);
            collector.Join();
        }
    }
}
