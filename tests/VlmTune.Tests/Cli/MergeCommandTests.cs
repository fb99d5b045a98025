using System.Text.Json;
using System.Text.RegularExpressions;
using VlmTune.Checkpoints;
using VlmTune.Models;
using VlmTune.Tests.Support;
using VlmTune.Tests.Training;
using VlmTune.Training;

namespace VlmTune.Tests.Cli;

/// <summary><c>vlmtune merge</c> and <c>vlmtune chat --adapter</c> end to end, in child processes.</summary>
public sealed class MergeCommandTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vlmtune-merge-cli-").FullName;

    public void Dispose()
    {
        try { Directory.Delete(_dir, true); } catch (IOException) { }
    }

    private sealed record Result(int ExitCode, string Stdout, string Stderr);

    private static Result Run(params string[] args) => Run((IEnumerable<string>)args);

    private static Result Run(IEnumerable<string> args)
    {
        var (code, stdout, stderr) = CliProcess.RunAsync(args, timeoutSeconds: 300).GetAwaiter().GetResult();
        return new Result(code, stdout, stderr);
    }

    private static int[] ChatIds(string model, string prompt, string? image = null, string? adapter = null)
    {
        var args = new List<string> { "chat", "--model", model, "--prompt", prompt, "--max-new-tokens", "8", "--json" };
        if (image is not null) args.AddRange(["--image", image]);
        if (adapter is not null) args.AddRange(["--adapter", adapter]);
        var r = Run(args);
        Assert.True(r.ExitCode == 0, r.Stderr);
        using var json = JsonDocument.Parse(r.Stdout);
        return json.RootElement.GetProperty("token_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
    }

    private static double VerifiedDiff(Result r)
    {
        Assert.True(r.ExitCode == 0, r.Stderr + r.Stdout);
        var m = Regex.Match(r.Stdout, @"verify: max \|logit difference\| (?<d>[0-9.e+-]+) over \d+ prompt positions");
        Assert.True(m.Success, r.Stdout);
        return double.Parse(m.Groups["d"].Value, System.Globalization.CultureInfo.InvariantCulture);
    }

    [FixtureFact]
    public void MergedFolderChatsLikeTheBaseWithTheAdapterUnmerged()
    {
        string outDir = Path.Combine(_dir, "merged");
        var r = Run("merge", "--base", Fixtures.TinyModel, "--adapter", Fixtures.Adapter, "--out", outDir, "--dtype", "float32");
        Assert.True(VerifiedDiff(r) <= 1e-3, r.Stdout);
        Assert.Contains("merge: 55/55 tensors", r.Stdout);   // piped: progress as plain lines
        Assert.Contains($"merged model written to {outDir}", r.Stdout);

        string image = Path.Combine(Fixtures.TinyDir, "images", "tiny.png");
        var merged = ChatIds(outDir, "What is in the picture?", image);
        var unmerged = ChatIds(Fixtures.TinyModel, "What is in the picture?", image, adapter: Fixtures.Adapter);
        Assert.Equal(unmerged, merged);
        Assert.NotEqual(ChatIds(Fixtures.TinyModel, "What is in the picture?", image), merged);
    }

    [FixtureFact]
    public void RefusalsAndBadOptionsExitWithOneClearError()
    {
        var same = Run("merge", "--base", Fixtures.TinyModel, "--adapter", Fixtures.Adapter, "--out", Fixtures.TinyModel + "/", "--force");
        Assert.Equal(1, same.ExitCode);
        Assert.StartsWith("error: merge: --out is the base model folder", same.Stderr);

        string busy = Path.Combine(_dir, "busy");
        Directory.CreateDirectory(busy);
        File.WriteAllText(Path.Combine(busy, "x"), "");
        var r = Run("merge", "--base", Fixtures.TinyModel, "--adapter", Path.Combine(_dir, "missing"), "--out", busy, "--max-shard-size", "-3");
        Assert.Equal(1, r.ExitCode);
        Assert.Contains("--max-shard-size '-3' is not a size", r.Stderr);

        r = Run("merge", "--base", Fixtures.TinyModel, "--adapter", Path.Combine(_dir, "missing"), "--out", busy, "--dtype", "int8");
        Assert.Equal(1, r.ExitCode);
        Assert.Contains("--dtype 'int8' is not supported", r.Stderr);

        r = Run("merge", "--base", Fixtures.TinyModel, "--adapter", Path.Combine(_dir, "missing"), "--out", busy);
        Assert.Equal(1, r.ExitCode);
        Assert.Contains("--adapter", r.Stderr);
        Assert.Contains("folder not found", r.Stderr);
        Assert.Contains("is not empty; pass --force", r.Stderr);     // every path problem at once

        r = Run("merge", "--base", Fixtures.TinyModel, "--adapter", Fixtures.Adapter, "--out", Path.Combine(_dir, "onnx"), "--layout", "onnx");
        Assert.Equal(1, r.ExitCode);
        Assert.StartsWith("error: --layout 'onnx' is not a layout (official or hf).", r.Stderr);

        var chat = Run("chat", "--model", Fixtures.TinyModel, "--adapter", Path.Combine(_dir, "missing"), "--prompt", "hi");
        Assert.Equal(1, chat.ExitCode);
        Assert.Contains("adapter folder not found", chat.Stderr);
    }

    [FixtureFact]
    public void LayoutHfWritesTransformersLayoutAndSaysTheTemplateIsNotKept()
    {
        string outDir = Path.Combine(_dir, "hf");
        var r = Run("merge", "--base", Fixtures.TinyModel, "--adapter", Fixtures.Adapter, "--out", outDir, "--layout", "hf", "--no-verify");
        Assert.True(r.ExitCode == 0, r.Stderr + r.Stdout);
        Assert.Contains("note: the hf layout has no template field; VlmTune reads hf folders with internvl2_5, not this base's internlm2-chat", r.Stdout);
        Assert.Contains("merge: 67/67 tensors", r.Stdout);   // 55 official tensors, 6 fused q/k/v become 18
        using var config = JsonDocument.Parse(File.ReadAllText(Path.Combine(outDir, "config.json")));
        Assert.Equal(HfConfig.Architecture, config.RootElement.GetProperty("architectures")[0].GetString());
        using var weights = CheckpointFolder.Open(outDir);
        Assert.Contains("model.language_model.layers.1.self_attn.v_proj.weight", weights.Names);
    }

    /// <summary>
    /// Train a few steps on generated data (LLM LoRA + vision LoRA + trained projector), merge the work dir's latest
    /// checkpoint with the CLI, and chat with the merged folder: the same answer as the base running the checkpoint unmerged.
    /// </summary>
    [FixtureFact]
    public void TrainMergeChatRoundTrip()
    {
        using var data = new TrainTestData(samples: 6);
        TrainResult trained;
        using (var trainer = new Trainer(data.Config("max_steps=6", "lr=0.01", "vision_lora_r=4", "freeze_projector=false", "dataloader_num_workers=0")))
            trained = trainer.Train();
        string checkpoint = trained.LastCheckpoint!;
        Assert.True(File.Exists(Path.Combine(checkpoint, IterCheckpoint.TrainableFile)));
        Assert.True(File.Exists(Path.Combine(checkpoint, IterCheckpoint.VisionAdapterDir, PeftAdapter.WeightsFile)));

        string outDir = Path.Combine(_dir, "merged");
        var r = Run("merge", "--base", Fixtures.TinyModel, "--adapter", data.WorkDir, "--out", outDir, "--dtype", "float32");
        Assert.True(VerifiedDiff(r) <= 1e-3, r.Stdout);
        Assert.Contains("training checkpoint (lora): LLM LoRA r=8", r.Stdout);
        Assert.Contains("vision LoRA r=4", r.Stdout);
        Assert.Contains("trained tensors (mlp1)", r.Stdout);

        // Every trained part changed the merged weights.
        using (var baseWeights = CheckpointFolder.Open(Fixtures.TinyModel))
        using (var merged = CheckpointFolder.Open(outDir))
            foreach (var name in new[] { "mlp1.1.weight", "vision_model.encoder.layers.0.attn.qkv.weight", "language_model.model.layers.0.attention.wqkv.weight" })
                Assert.False(baseWeights.Read(name).to_type(TorchSharp.torch.ScalarType.Float32).allclose(merged.Read(name), 0, 0), name);

        // The checkpoint's vision_lora/ alone is a plain PEFT adapter of the vision encoder (names relative to vision_model).
        var visionOnly = ModelMerger.Merge(new MergeOptions { BaseDir = Fixtures.TinyModel, AdapterDir = Path.Combine(checkpoint, IterCheckpoint.VisionAdapterDir), OutDir = Path.Combine(_dir, "vision-only") });
        Assert.True(visionOnly.Verify!.Passed, visionOnly.Verify.ToString());
        Assert.Equal(8, visionOnly.LoraModules);   // qkv, proj, fc1, fc2 of 2 ViT layers

        string image = Path.Combine(data.Dir, "images", "tiny.png");
        foreach (var (prompt, picture) in new[] { ("What is in the picture?", image), ("Say hello.", null) })
        {
            var fromMerged = ChatIds(outDir, prompt, picture);
            Assert.Equal(ChatIds(Fixtures.TinyModel, prompt, picture, adapter: checkpoint), fromMerged);
        }
    }
}
