using VlmTune.Tests.Support;

namespace VlmTune.Tests.Cli;

/// <summary>The --device and --dtype options of every command list what TensorPlacement accepts, no less.</summary>
public sealed class PlacementOptionTests
{
    [Theory]
    [InlineData("chat")]
    [InlineData("serve")]
    [InlineData("merge")]
    [InlineData("bench", "decode")]
    [InlineData("bench", "train")]
    public async Task HelpListsEveryAcceptedDeviceAndDTypeName(params string[] command)
    {
        var (code, stdout, stderr) = await CliProcess.RunAsync([.. command, "--help"], timeoutSeconds: 120);
        Assert.True(code == 0, stderr);
        foreach (var name in new[] { "cuda:N", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16" })
            Assert.Contains(name, stdout);
    }
}
