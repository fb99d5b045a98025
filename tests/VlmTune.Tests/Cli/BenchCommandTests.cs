using System.Text.Json;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Cli;

public class BenchCommandTests
{
    private static List<string> Decode(params string[] extra) =>
    [
        "bench", "decode", "--config", Path.Combine(Fixtures.TinyModel, "config.json"), "--device", "cpu", "--batch", "2",
        "--prompt-tokens", "320", "--tiles", "1", "--new-tokens", "2", "--warmup", "0", .. extra,
    ];

    [FixtureFact]
    public async Task DecodeOnCpuFallsBackToTorchSharpAndSaysWhy()
    {
        var (code, stdout, stderr) = await CliProcess.RunAsync(Decode(), timeoutSeconds: 120);
        Assert.True(code == 0, stderr);
        Assert.Contains("fused decoding unavailable", stderr);
        Assert.Contains("not CUDA", stderr);
        var result = JsonDocument.Parse(stdout.Trim().Split('\n')[^1]).RootElement;
        Assert.False(result.GetProperty("fused").GetBoolean());
        Assert.Equal(2, result.GetProperty("batch").GetInt32());
    }

    [FixtureFact]
    public async Task FusedTrueWhereUnsupportedIsAnError()
    {
        var (code, _, stderr) = await CliProcess.RunAsync(Decode("--fused", "true"), timeoutSeconds: 120);
        Assert.Equal(1, code);
        Assert.Contains("error: --fused true: the fused decoder is unavailable", stderr);
        Assert.Contains("not CUDA", stderr);
    }

    /// <summary>VLMTUNE_FUSED_DECODE=0 travels from the CLI's start-up to the decoder: off before any model check.</summary>
    [FixtureFact]
    public async Task FusedDecodeSwitchFromTheEnvironmentReachesTheDecoder()
    {
        var (code, _, stderr) = await CliProcess.RunAsync(Decode("--fused", "true"),
            new Dictionary<string, string> { [RuntimeSwitches.FusedDecodeVariable] = "0" }, timeoutSeconds: 120);
        Assert.Equal(1, code);
        Assert.Contains($"error: --fused true: the fused decoder is unavailable: {RuntimeSwitches.FusedDecodeVariable}=0", stderr);
        Assert.DoesNotContain("not CUDA", stderr);
    }
}
