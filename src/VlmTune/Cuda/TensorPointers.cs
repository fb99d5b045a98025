using System.Runtime.InteropServices;
using TorchSharp;

namespace VlmTune.Cuda;

/// <summary>
/// The raw data pointer of a tensor (device memory for CUDA tensors), which our kernels and NCCL need. TorchSharp exposes no
/// data_ptr, but its native LibTorchSharp exports THSTensor_data(handle) → tensor.data_ptr().
/// </summary>
public static class TensorPointers
{
    [DllImport("LibTorchSharp")]
    private static extern IntPtr THSTensor_data(IntPtr tensorHandle);

    /// <summary>Address of element 0 (storage offset included) of <paramref name="tensor"/>.</summary>
    public static IntPtr DataPointer(torch.Tensor tensor)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        torch.InitializeDeviceType(DeviceType.CPU); // makes sure TorchSharp has loaded LibTorchSharp before we call into it
        var ptr = THSTensor_data(tensor.Handle);
        if (ptr == IntPtr.Zero && tensor.numel() > 0) torch.CheckForErrors();
        return ptr;
    }
}
