using VlmTune.Checkpoints;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Checkpoints;

public class SafetensorsFileTests
{
    [FixtureFact]
    public void ReadsTheTinyCheckpointLazily()
    {
        using var file = SafetensorsFile.Open(Path.Combine(Fixtures.TinyModel, "model.safetensors"));
        Assert.Equal(55, file.Entries.Count);
        using var t = file.Read("mlp1.1.weight");
        Assert.Equal(new long[] { 64, 256 }, t.shape);
        Assert.Equal(TorchSharp.torch.ScalarType.BFloat16, t.dtype);
    }
}
