using VlmTune.Checkpoints;
using VlmTune.Models;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Checkpoints;

public sealed class ModelFolderErrorTests
{
    private static Exception LoadError(ModelFolderBuilder b, int shards = 1) =>
        Assert.ThrowsAny<VlmTuneException>(() => InternVLModelLoader.Load(b.Build(shards), new ModelOptions()).Dispose());

    [FixtureFact]
    public void MissingTensorIsNamed()
    {
        using var b = new ModelFolderBuilder().Drop("language_model.model.layers.1.ffn_norm.weight");
        var e = LoadError(b);
        Assert.Contains("missing tensor: 'language_model.model.layers.1.ffn_norm.weight'", e.Message);
        Assert.Contains(b.Dir, e.Message);
    }

    [FixtureFact]
    public void UnexpectedTensorIsNamed()
    {
        using var b = new ModelFolderBuilder().Add("language_model.extra.weight", "F32", [2], new byte[8]);
        Assert.Contains("unexpected tensor (not part of this model): 'language_model.extra.weight'", LoadError(b).Message);
    }

    [FixtureFact]
    public void ShapeMismatchNamesTensorExpectedAndGot()
    {
        using var b = new ModelFolderBuilder().Reshape("mlp1.3.weight", 32, 128);
        Assert.Contains("shape mismatch for 'mlp1.3.weight' in model.safetensors: expected [64, 64], got [32, 128]", LoadError(b).Message);
    }

    [FixtureFact]
    public void UnsupportedArchitectureListsTheSupportedOnes()
    {
        using var b = new ModelFolderBuilder().Config(c => c["llm_config"]!["architectures"] = new System.Text.Json.Nodes.JsonArray("Qwen3MoeForCausalLM"));
        var e = LoadError(b);
        Assert.Contains("'Qwen3MoeForCausalLM' (the InternVL3.5 MoE checkpoints", e.Message);
        Assert.Contains("supported: InternLM2ForCausalLM", e.Message);
        Assert.Contains("config.json", e.Message);
    }

    [FixtureFact]
    public void EveryMissingRequiredConfigFieldIsNamedAtOnce()
    {
        using var b = new ModelFolderBuilder().Config(c =>
        {
            c["llm_config"]!.AsObject().Remove("hidden_size");
            c["vision_config"]!.AsObject().Remove("num_hidden_layers");
        });
        var e = LoadError(b);
        Assert.Contains("'llm_config.hidden_size'", e.Message);
        Assert.Contains("'vision_config.num_hidden_layers'", e.Message);
    }

    [FixtureFact]
    public void TruncatedWeightsFileIsReported()
    {
        using var b = new ModelFolderBuilder();
        var dir = b.Build();
        var path = Path.Combine(dir, "model.safetensors");
        var bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(path, bytes[..(bytes.Length - 100)]);
        var e = Assert.Throws<CheckpointException>(() => InternVLModelLoader.Load(dir, new ModelOptions()));
        Assert.Contains("truncated", e.Message);
        Assert.Contains(path, e.Message);
    }

    [FixtureFact]
    public void ShardedCheckpointLoadsLikeTheSingleFile()
    {
        using var b = new ModelFolderBuilder();
        using var sharded = InternVLModelLoader.Load(b.Build(shards: 3), new ModelOptions());
        using var single = InternVLModelLoader.Load(Fixtures.TinyModel, new ModelOptions());
        var a = sharded.state_dict();
        foreach (var (name, t) in single.state_dict())
            Assert.True(t.equal(a[name]).all().item<bool>(), name);
    }

    [FixtureFact]
    public void ShardMissingFromTheIndexIsNamed()
    {
        using var b = new ModelFolderBuilder();
        var dir = b.Build(shards: 2);
        File.Delete(Path.Combine(dir, "model-00002-of-00002.safetensors"));
        var e = Assert.Throws<CheckpointException>(() => InternVLModelLoader.Load(dir, new ModelOptions()));
        Assert.Contains("model-00002-of-00002.safetensors", e.Message);
        Assert.Contains("missing", e.Message);
    }

    [FixtureFact]
    public void IndexEntryThatIsNotAFileNameIsNamed()
    {
        using var b = new ModelFolderBuilder();
        var dir = b.Build(shards: 2);
        string index = Path.Combine(dir, CheckpointFolder.IndexFile);
        File.WriteAllText(index, File.ReadAllText(index).Replace("\"model-00002-of-00002.safetensors\"", "2"));
        var e = Assert.Throws<CheckpointException>(() => InternVLModelLoader.Load(dir, new ModelOptions()));
        Assert.Contains(index, e.Message);
        Assert.Contains("must be a file name (a string), not 2", e.Message);
    }

    [Theory]
    [InlineData("\"lora_dropout\": \"x\"", "'lora_dropout' must be a number")]
    [InlineData("\"lora_alpha\": [16]", "'lora_alpha' must be a number")]
    [InlineData("\"r\": 8.5", "r must be a positive integer (got 8.5)")]
    [InlineData("\"lora_dropout\": 1.5", "lora_dropout must be in [0, 1)")]
    [InlineData("\"target_modules\": 5", "target_modules must be a list of module names or a regex string, not 5")]
    [InlineData("\"r\": 16", "invalid JSON", true)]   // a second "r": was an ArgumentException without the file
    public void AdapterConfigFieldsOfTheWrongTypeAreRefusedNotIgnored(string field, string message, bool duplicate = false)
    {
        string dir = Directory.CreateTempSubdirectory("vlmtune-adapter-config-").FullName;
        try
        {
            string path = Path.Combine(dir, PeftAdapter.ConfigFile);
            var fields = new Dictionary<string, string> { ["peft_type"] = "\"LORA\"", ["r"] = "8", ["lora_alpha"] = "16", ["target_modules"] = "[\"wqkv\"]" };
            string key = field[1..field.IndexOf('"', 1)];
            if (!duplicate) fields.Remove(key);
            File.WriteAllText(path, "{" + string.Join(", ", fields.Select(f => $"\"{f.Key}\": {f.Value}").Append(field)) + "}");
            var e = Assert.Throws<CheckpointException>(() => PeftAdapterConfig.Load(path));
            Assert.Contains(path, e.Message);
            Assert.Contains(message, e.Message);
        }
        finally { Directory.Delete(dir, true); }
    }
}
