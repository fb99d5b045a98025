using TorchSharp;
using VlmTune.Distributed;

namespace VlmTune.Tests.Distributed;

public class NcclTests
{
    [Fact]
    public void MissingNcclIsAClearErrorListingWhereItLooked()
    {
        var empty = Directory.CreateTempSubdirectory("vlmtune-nccl-").FullName;
        try
        {
            var e = Assert.Throws<DistributedException>(() => NcclLibrary.Load([empty], trySystemLoader: false));
            Assert.Contains("libnccl.so.2", e.Message);
            Assert.Contains(Path.Combine(empty, "libnccl.so.2"), e.Message);
            Assert.Contains("LD_LIBRARY_PATH", e.Message);
        }
        finally { Directory.Delete(empty, true); }
    }

    [Fact]
    public void DefaultSearchNeverCrashes()
    {
        // On a CPU machine NCCL is absent (a DistributedException); where it is installed it loads.
        try { Assert.EndsWith("libnccl.so.2", NcclLibrary.Load().Path); }
        catch (DistributedException e) { Assert.Contains("libnccl.so.2", e.Message); }
    }

    [Fact]
    public void PytorchWheelLayoutIsSearched()
    {
        var dirs = NcclLibrary.DefaultSearchDirectories("/opt/cuda/lib64:/opt/py/site-packages/torch/lib");
        Assert.Equal("/opt/cuda/lib64", dirs[0]);
        Assert.Contains("/opt/py/site-packages/nvidia/nccl/lib", dirs);
    }

    [Fact]
    public void DataTypesFollowNcclNumbering()
    {
        Assert.Equal(7, NcclCommunicator.DataType(torch.ScalarType.Float32));
        Assert.Equal(9, NcclCommunicator.DataType(torch.ScalarType.BFloat16));
        Assert.Throws<ArgumentException>(() => NcclCommunicator.DataType(torch.ScalarType.Bool));
    }
}
