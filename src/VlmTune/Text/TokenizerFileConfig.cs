using System.Text.Json;

namespace VlmTune.Text;

/// <summary>
/// What the HF tokenizer files beside <c>tokenizer.model</c> say: the added tokens (<c>tokenizer_config.json</c>
/// <c>added_tokens_decoder</c> and <c>added_tokens.json</c>), which of them are special, and the BOS/EOS switches.
/// </summary>
internal sealed record TokenizerFileConfig(
    IReadOnlyDictionary<string, int> AddedTokens,
    IReadOnlySet<string> SpecialTokenContents,
    bool AddBosToken,
    bool AddEosToken,
    string? PadToken)
{
    public static TokenizerFileConfig Read(string modelDir)
    {
        var problems = new List<string>();
        var added = new Dictionary<string, int>(StringComparer.Ordinal);
        var special = new HashSet<string>(StringComparer.Ordinal);
        var addBos = true;   // InternLM2Tokenizer's defaults
        var addEos = false;
        string? padToken = null;

        void AddToken(string content, int id, string source)
        {
            if (added.TryGetValue(content, out var existing) && existing != id)
                problems.Add($"{source}: token '{content}' has id {id}, but id {existing} elsewhere");
            else if (added.FirstOrDefault(kv => kv.Value == id && kv.Key != content) is { Key: not null } other)
                problems.Add($"{source}: id {id} is given to both '{other.Key}' and '{content}'");
            else added[content] = id;
        }

        var configPath = Path.Combine(modelDir, "tokenizer_config.json");
        if (ReadJson(configPath, problems) is { } config)
        {
            if (config.TryGetProperty("added_tokens_decoder", out var decoder) && decoder.ValueKind == JsonValueKind.Object)
            {
                foreach (var entry in decoder.EnumerateObject())
                {
                    var where = $"{configPath}: added_tokens_decoder.{entry.Name}";
                    if (!int.TryParse(entry.Name, out var id) || id < 0) { problems.Add($"{where}: the key must be a token id"); continue; }
                    if (entry.Value.ValueKind != JsonValueKind.Object || !entry.Value.TryGetProperty("content", out var c) ||
                        c.ValueKind != JsonValueKind.String || string.IsNullOrEmpty(c.GetString()))
                    {
                        problems.Add($"{where}: needs a non-empty string \"content\"");
                        continue;
                    }
                    AddToken(c.GetString()!, id, where);
                    if (entry.Value.TryGetProperty("special", out var s) && s.ValueKind == JsonValueKind.True) special.Add(c.GetString()!);
                }
            }
            addBos = ReadBool(config, "add_bos_token", addBos, configPath, problems);
            addEos = ReadBool(config, "add_eos_token", addEos, configPath, problems);
            ReadSpecialNames(config, configPath, special, ref padToken, problems);
        }

        var mapPath = Path.Combine(modelDir, "special_tokens_map.json");
        if (ReadJson(mapPath, problems) is { } map) ReadSpecialNames(map, mapPath, special, ref padToken, problems);

        var addedPath = Path.Combine(modelDir, "added_tokens.json");
        if (ReadJson(addedPath, problems) is { } addedJson)
        {
            if (addedJson.ValueKind != JsonValueKind.Object) problems.Add($"{addedPath}: expected an object of token -> id");
            else
                foreach (var entry in addedJson.EnumerateObject())
                {
                    if (entry.Value.ValueKind == JsonValueKind.Number && entry.Value.TryGetInt32(out var id) && id >= 0)
                        AddToken(entry.Name, id, $"{addedPath}: \"{entry.Name}\"");
                    else problems.Add($"{addedPath}: \"{entry.Name}\" must map to a non-negative integer id");
                }
        }

        if (problems.Count > 0)
            throw new VlmTuneException($"Invalid tokenizer files in '{modelDir}':\n  " + string.Join("\n  ", problems));
        return new TokenizerFileConfig(added, special, addBos, addEos, padToken);
    }

    private static JsonElement? ReadJson(string path, List<string> problems)
    {
        if (!File.Exists(path)) return null;
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            return doc.RootElement.Clone();
        }
        catch (JsonException e)
        {
            problems.Add($"{path}: not valid JSON ({e.Message})");
            return null;
        }
    }

    private static bool ReadBool(JsonElement obj, string name, bool fallback, string path, List<string> problems)
    {
        if (!obj.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null) return fallback;
        if (v.ValueKind is JsonValueKind.True or JsonValueKind.False) return v.GetBoolean();
        problems.Add($"{path}: \"{name}\" must be true or false, not {v.GetRawText()}");
        return fallback;
    }

    /// <summary>bos/eos/unk/pad and additional_special_tokens: the tokens HF's <c>all_special_ids</c> holds.</summary>
    private static void ReadSpecialNames(JsonElement obj, string path, HashSet<string> special, ref string? padToken,
        List<string> problems)
    {
        foreach (var name in new[] { "bos_token", "eos_token", "unk_token", "pad_token" })
            if (obj.TryGetProperty(name, out var v) && TokenContent(v) is { } content)
            {
                special.Add(content);
                if (name == "pad_token") padToken = content;
            }
        if (!obj.TryGetProperty("additional_special_tokens", out var extra) || extra.ValueKind == JsonValueKind.Null) return;
        if (extra.ValueKind != JsonValueKind.Array) { problems.Add($"{path}: \"additional_special_tokens\" must be a list"); return; }
        foreach (var item in extra.EnumerateArray())
            if (TokenContent(item) is { } content) special.Add(content);
            else problems.Add($"{path}: additional_special_tokens entry {item.GetRawText()} is not a token");
    }

    /// <summary>A token given as a plain string or as an AddedToken object <c>{"content": ...}</c>.</summary>
    private static string? TokenContent(JsonElement v) => v.ValueKind switch
    {
        JsonValueKind.String => v.GetString(),
        JsonValueKind.Object when v.TryGetProperty("content", out var c) && c.ValueKind == JsonValueKind.String => c.GetString(),
        _ => null,
    };
}
