using System.Text.Json;
using Microsoft.ML.Tokenizers;

namespace VlmTune.Data;

/// <summary>
/// Sets up length measurement for a model folder: its tokenizer counts text tokens, and its config.json gives the
/// tiling (max/min_dynamic_patch, use_thumbnail) and the image tokens per tile
/// ((force_image_size / patch_size)² × downsample_ratio²).
/// </summary>
public static class ModelLength
{
    public static ValidationOptions Configure(ValidationOptions options, string modelDir)
    {
        var configPath = Path.Combine(modelDir, "config.json");
        if (!File.Exists(configPath)) throw new VlmTuneException($"{configPath} not found: --model must be a model folder with config.json and tokenizer.model");
        using var config = JsonDocument.Parse(File.ReadAllText(configPath));
        var root = config.RootElement;
        int Int(JsonElement e, string name, int fallback) => e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetInt32() : fallback;
        var imageSize = Int(root, "force_image_size", 448);
        var patch = root.TryGetProperty("vision_config", out var vision) ? Int(vision, "patch_size", 14) : 14;
        var downsample = root.TryGetProperty("downsample_ratio", out var d) && d.ValueKind == JsonValueKind.Number ? d.GetDouble() : 0.5;
        var tokensPerTile = (int)(Math.Pow(imageSize / patch, 2) * downsample * downsample);
        var dynamic = !root.TryGetProperty("dynamic_image_size", out var dyn) || dyn.ValueKind != JsonValueKind.False;
        return options with
        {
            Tokens = LoadTokenizer(modelDir),
            TokensPerTile = tokensPerTile,
            MaxTiles = dynamic ? Int(root, "max_dynamic_patch", options.MaxTiles) : 1,
            MinTiles = dynamic ? Int(root, "min_dynamic_patch", options.MinTiles) : 1,
            UseThumbnail = dynamic && root.TryGetProperty("use_thumbnail", out var t) && t.ValueKind == JsonValueKind.True,
        };
    }

    private static ITextTokenCounter LoadTokenizer(string modelDir)
    {
        var modelPath = Path.Combine(modelDir, "tokenizer.model");
        if (!File.Exists(modelPath)) throw new VlmTuneException($"{modelPath} not found: --model must be a model folder with config.json and tokenizer.model");
        var special = new Dictionary<string, int>(StringComparer.Ordinal);
        var tokenizerConfig = Path.Combine(modelDir, "tokenizer_config.json");
        if (File.Exists(tokenizerConfig))
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(tokenizerConfig));
            if (doc.RootElement.TryGetProperty("added_tokens_decoder", out var added))
                foreach (var p in added.EnumerateObject())
                    if (int.TryParse(p.Name, out var id) && p.Value.TryGetProperty("content", out var c)) special[c.GetString()!] = id;
        }
        using var stream = File.OpenRead(modelPath);
        return new SentencePieceCounter(LlamaTokenizer.Create(stream, addBeginOfSentence: true, addEndOfSentence: false, specialTokens: special));
    }

    private sealed class SentencePieceCounter(Tokenizer tokenizer) : ITextTokenCounter
    {
        public int Count(string text) => tokenizer.CountTokens(text);
    }
}
