using System.Runtime.InteropServices;
using TorchSharp;
using VlmTune.Cuda;

namespace VlmTune.Tests.Cuda;

public class TensorPointersTests
{
    [Fact]
    public void DataPointerAddressesTheTensorsStorage()
    {
        using var t = torch.arange(0, 8, dtype: torch.float32);
        var p = TensorPointers.DataPointer(t);
        var read = new float[8];
        Marshal.Copy(p, read, 0, 8);
        Assert.Equal([0f, 1, 2, 3, 4, 5, 6, 7], read);
        Marshal.Copy(new[] { 42f }, 0, p + 3 * sizeof(float), 1); // written through the pointer...
        Assert.Equal(42f, MemoryMarshal.Cast<byte, float>(t.bytes.ToArray())[3]); // ...seen by TorchSharp's own bytes

        // A view's pointer includes its storage offset.
        using var view = t.narrow(0, 2, 6);
        Assert.Equal(p + 2 * sizeof(float), TensorPointers.DataPointer(view));
    }
}
