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

    [FixtureFact]
    public async Task TrainRunsTheTrainersStepInEveryMode()
    {
        // 1 tile (256 image tokens) + 80 text tokens per sample; two steps each of LoRA, QLoRA and full fine-tuning on CPU.
        var (code, stdout, stderr) = await CliProcess.RunAsync(
        [
            "bench", "train", "--config", Path.Combine(Fixtures.TinyModel, "config.json"), "--device", "cpu", "--mode", "lora", "qlora", "full",
            "--batch-size", "2", "--tiles-per-sample", "1", "--seq-len", "336", "--lora-r", "4", "--steps", "2", "--warmup-steps", "1",
        ], timeoutSeconds: 300);
        Assert.True(code == 0, stderr);
        var results = stdout.Trim().Split('\n').Select(l => JsonDocument.Parse(l).RootElement).ToDictionary(r => r.GetProperty("mode").GetString()!);
        Assert.Equal(["full", "lora", "qlora"], results.Keys.Order());
        foreach (var (mode, r) in results)
        {
            Assert.True(double.IsFinite(r.GetProperty("loss").GetDouble()), mode);
            Assert.True(r.GetProperty("tokens_per_s").GetDouble() > 0, mode);
        }
        // The recipe's LoRA (TrainConfig's alpha, the model's default targets) and what full fine-tuning trains.
        Assert.Equal(256, results["lora"].GetProperty("lora_alpha").GetDouble());
        Assert.Equal(results["lora"].GetProperty("trainable_params").GetInt64(), results["qlora"].GetProperty("trainable_params").GetInt64());
        Assert.True(results["full"].GetProperty("trainable_params").GetInt64() > 10 * results["lora"].GetProperty("trainable_params").GetInt64());
    }

    [FixtureFact]
    public async Task TrainWorkloadClotIsOneTileAndAShortAnswerUnlessTheShapeIsGiven()
    {
        List<string> Args(string workload, params string[] extra) =>
        [
            "bench", "train", "--config", Path.Combine(Fixtures.TinyModel, "config.json"), "--device", "cpu", "--workload", workload,
            "--batch-size", "1", "--lora-r", "4", "--steps", "1", "--warmup-steps", "0", .. extra,
        ];
        var (code, stdout, stderr) = await CliProcess.RunAsync(Args("clot"), timeoutSeconds: 300);
        Assert.True(code == 0, stderr);
        var clot = JsonDocument.Parse(stdout.Trim().Split('\n')[^1]).RootElement;
        Assert.Equal("clot", clot.GetProperty("workload").GetString());
        Assert.Equal(1, clot.GetProperty("tiles_per_sample").GetInt32());
        Assert.Equal(380, clot.GetProperty("seq_len").GetInt32());
        Assert.False(clot.GetProperty("fused_adamw").GetBoolean());   // CPU: TorchSharp's AdamW

        (code, stdout, stderr) = await CliProcess.RunAsync(Args("clot", "--seq-len", "300"), timeoutSeconds: 300);
        Assert.True(code == 0, stderr);
        Assert.Equal(300, JsonDocument.Parse(stdout.Trim().Split('\n')[^1]).RootElement.GetProperty("seq_len").GetInt32());

        (code, _, stderr) = await CliProcess.RunAsync(Args("huge"), timeoutSeconds: 120);
        Assert.Equal(1, code);
        Assert.Contains("error: --workload 'huge' is not long or clot.", stderr);
    }

    [FixtureFact]
    public async Task TrainOptimSelectsTheEightBitStatesAndReportsTheirSize()
    {
        List<string> Args(params string[] extra) =>
        [
            "bench", "train", "--config", Path.Combine(Fixtures.TinyModel, "config.json"), "--device", "cpu", "--mode", "qlora", "--workload", "clot",
            "--batch-size", "1", "--lora-r", "4", "--steps", "1", "--warmup-steps", "0", .. extra,
        ];
        // One command measures both: each mode with each optimizer, one line each.
        var (code, stdout, stderr) = await CliProcess.RunAsync(Args("--optim", "adamw", "adamw_bnb_8bit"), timeoutSeconds: 300);
        Assert.True(code == 0, stderr);
        var lines = stdout.Trim().Split('\n').Select(l => JsonDocument.Parse(l).RootElement).ToList();
        Assert.Equal(2, lines.Count);
        var (fp32, eightBit) = (lines[0], lines[1]);
        Assert.Contains("optimizer: adamw_bnb_8bit, 8-bit block-wise AdamW states", stderr);
        Assert.Equal(("adamw", "adamw_8bit"), (fp32.GetProperty("optim").GetString(), eightBit.GetProperty("optim").GetString()));
        Assert.True(double.IsFinite(eightBit.GetProperty("loss").GetDouble()));
        // fp32 AdamW: 8 bytes a trainable parameter; here the head's LoRA B and the projector take ~2.
        double fp32Mib = fp32.GetProperty("optimizer_state_mib").GetDouble(), eightBitMib = eightBit.GetProperty("optimizer_state_mib").GetDouble();
        Assert.Equal(Math.Round(8.0 * fp32.GetProperty("trainable_params").GetInt64() / (1 << 20), 1), fp32Mib);
        Assert.True(eightBitMib < 0.5 * fp32Mib, $"8-bit states {eightBitMib} MiB, fp32 {fp32Mib} MiB");

        (code, _, stderr) = await CliProcess.RunAsync(Args("--optim", "sgd"), timeoutSeconds: 120);
        Assert.Equal(1, code);
        Assert.Contains("error: --optim: 'sgd' is not an optimizer vlmtune has (accepted: adamw or adamw_torch", stderr);
    }

    [FixtureFact]
    public async Task MakeModelWritesAFolderThatLoads()
    {
        var dir = Path.Combine(Directory.CreateTempSubdirectory("vlmtune-make-model-").FullName, "model");
        try
        {
            var (code, stdout, stderr) = await CliProcess.RunAsync(
                ["bench", "make-model", "--config", Path.Combine(Fixtures.TinyModel, "config.json"), "--tokenizer-from", Fixtures.TinyModel, "--out", dir, "--device", "cpu", "--seed", "3"],
                timeoutSeconds: 120);
            Assert.True(code == 0, stderr);
            Assert.Contains($"wrote {dir}", stdout);
            using var model = VlmTune.Checkpoints.InternVLModelLoader.Load(dir, new VlmTune.Models.ModelOptions());
            using var reference = VlmTune.Checkpoints.InternVLModelLoader.Load(Fixtures.TinyModel, new VlmTune.Models.ModelOptions());
            Assert.Equal(reference.parameters().Sum(p => p.numel()), model.parameters().Sum(p => p.numel()));
            Assert.True(File.Exists(Path.Combine(dir, "tokenizer.model")));
        }
        finally { Directory.Delete(Path.GetDirectoryName(dir)!, recursive: true); }
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
