using System.Text.Json;

namespace VlmTune.Text;

/// <summary>
/// An added token with the flags of HF's <c>AddedToken</c>: <c>lstrip</c>/<c>rstrip</c> eat the white space beside it,
/// <c>single_word</c> only matches it between non-word characters.
/// </summary>
internal sealed record AddedTokenSpec(string Content, int Id, bool Special, bool LStrip = false, bool RStrip = false,
    bool SingleWord = false, bool Normalized = false);

/// <summary>
/// What the HF tokenizer files beside the model say: the added tokens (<c>tokenizer_config.json</c>
/// <c>added_tokens_decoder</c>, <c>added_tokens.json</c>, and <c>tokenizer.json</c>'s <c>added_tokens</c> where given),
/// which of them are special, the bos/eos/unk/pad names, the BOS/EOS switches and the class-specific options.
/// Options a file leaves out are null: each tokenizer family has its own defaults.
/// </summary>
internal sealed record TokenizerFileConfig(
    IReadOnlyList<AddedTokenSpec> AddedTokenList,
    IReadOnlySet<string> SpecialTokenContents,
    bool? AddBosToken,
    bool? AddEosToken,
    SpecialTokenName BosToken,
    SpecialTokenName EosToken,
    SpecialTokenName UnkToken,
    SpecialTokenName PadToken,
    string? TokenizerClass,
    bool? Legacy,
    bool? AddPrefixSpace)
{
    /// <summary>Added token content -> id.</summary>
    public IReadOnlyDictionary<string, int> AddedTokens { get; } =
        AddedTokenList.ToDictionary(t => t.Content, t => t.Id, StringComparer.Ordinal);

    public static TokenizerFileConfig Read(string modelDir, IEnumerable<AddedTokenSpec>? fromTokenizerJson = null)
    {
        var problems = new List<string>();
        var added = new Dictionary<string, AddedTokenSpec>(StringComparer.Ordinal);
        var byId = new Dictionary<int, string>();
        var special = new HashSet<string>(StringComparer.Ordinal);
        bool? addBos = null, addEos = null, legacy = null, addPrefixSpace = null;
        SpecialTokenName bos = default, eos = default, unk = default, pad = default;
        string? tokenizerClass = null;

        void AddToken(AddedTokenSpec token, string source)
        {
            if (added.TryGetValue(token.Content, out var existing) && existing.Id != token.Id)
                problems.Add($"{source}: token '{token.Content}' has id {token.Id}, but id {existing.Id} elsewhere");
            else if (byId.TryGetValue(token.Id, out var other) && other != token.Content)
                problems.Add($"{source}: id {token.Id} is given to both '{other}' and '{token.Content}'");
            else if (existing is null || source.Contains("added_tokens_decoder", StringComparison.Ordinal))
            {
                added[token.Content] = token;   // added_tokens_decoder carries the flags: it wins over added_tokens.json
                byId[token.Id] = token.Content;
            }
            if (token.Special) special.Add(token.Content);
        }

        foreach (var token in fromTokenizerJson ?? []) AddToken(token, "tokenizer.json");

        var configPath = Path.Combine(modelDir, "tokenizer_config.json");
        if (ReadJson(configPath, problems) is { } config)
        {
            if (config.ValueKind != JsonValueKind.Object) problems.Add($"{configPath}: expected a JSON object");
            else
            {
                if (config.TryGetProperty("added_tokens_decoder", out var decoder) && decoder.ValueKind == JsonValueKind.Object)
                {
                    foreach (var entry in decoder.EnumerateObject())
                    {
                        var where = $"{configPath}: added_tokens_decoder.{entry.Name}";
                        if (!int.TryParse(entry.Name, out var id) || id < 0) { problems.Add($"{where}: the key must be a token id"); continue; }
                        if (ReadAddedToken(entry.Value, id, where, problems) is { } token) AddToken(token, where);
                    }
                }
                addBos = ReadBool(config, "add_bos_token", configPath, problems);
                addEos = ReadBool(config, "add_eos_token", configPath, problems);
                legacy = ReadBool(config, "legacy", configPath, problems);
                addPrefixSpace = ReadBool(config, "add_prefix_space", configPath, problems);
                if (config.TryGetProperty("tokenizer_class", out var cls) && cls.ValueKind == JsonValueKind.String) tokenizerClass = cls.GetString();
                ReadSpecialNames(config, configPath, special, ref bos, ref eos, ref unk, ref pad, problems);
            }
        }

        var mapPath = Path.Combine(modelDir, "special_tokens_map.json");
        if (ReadJson(mapPath, problems) is { } map)
        {
            if (map.ValueKind != JsonValueKind.Object) problems.Add($"{mapPath}: expected a JSON object");
            else ReadSpecialNames(map, mapPath, special, ref bos, ref eos, ref unk, ref pad, problems);
        }

        var addedPath = Path.Combine(modelDir, "added_tokens.json");
        if (ReadJson(addedPath, problems) is { } addedJson)
        {
            if (addedJson.ValueKind != JsonValueKind.Object) problems.Add($"{addedPath}: expected an object of token -> id");
            else
                foreach (var entry in addedJson.EnumerateObject())
                {
                    if (entry.Value.ValueKind == JsonValueKind.Number && entry.Value.TryGetInt32(out var id) && id >= 0)
                        AddToken(new AddedTokenSpec(entry.Name, id, Special: false), $"{addedPath}: \"{entry.Name}\"");
                    else problems.Add($"{addedPath}: \"{entry.Name}\" must map to a non-negative integer id");
                }
        }

        if (problems.Count > 0)
            throw new VlmTuneException($"Invalid tokenizer files in '{modelDir}': " + string.Join("; ", problems) + ".");
        return new TokenizerFileConfig([.. added.Values.OrderBy(t => t.Id)], special, addBos, addEos, bos, eos, unk, pad,
            tokenizerClass, legacy, addPrefixSpace);
    }

    /// <summary>One <c>AddedToken</c> object: <c>{"content": ..., "special": ..., "lstrip": ..., ...}</c>.</summary>
    internal static AddedTokenSpec? ReadAddedToken(JsonElement value, int id, string where, List<string> problems)
    {
        if (value.ValueKind != JsonValueKind.Object || !value.TryGetProperty("content", out var c) ||
            c.ValueKind != JsonValueKind.String || string.IsNullOrEmpty(c.GetString()))
        {
            problems.Add($"{where}: needs a non-empty string \"content\"");
            return null;
        }
        bool Flag(string name) => ReadBool(value, name, where, problems) ?? false;
        return new AddedTokenSpec(c.GetString()!, id, Flag("special"), Flag("lstrip"), Flag("rstrip"), Flag("single_word"), Flag("normalized"));
    }

    internal static JsonElement? ReadJson(string path, List<string> problems)
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

    private static bool? ReadBool(JsonElement obj, string name, string path, List<string> problems)
    {
        if (!obj.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null) return null;
        if (v.ValueKind is JsonValueKind.True or JsonValueKind.False) return v.GetBoolean();
        problems.Add($"{path}: \"{name}\" must be true or false, not {v.GetRawText()}");
        return null;
    }

    /// <summary>bos/eos/unk/pad and additional_special_tokens: the tokens HF's <c>all_special_ids</c> holds.</summary>
    private static void ReadSpecialNames(JsonElement obj, string path, HashSet<string> special, ref SpecialTokenName bos,
        ref SpecialTokenName eos, ref SpecialTokenName unk, ref SpecialTokenName pad, List<string> problems)
    {
        bos = ReadName(obj, "bos_token", bos, special);
        eos = ReadName(obj, "eos_token", eos, special);
        unk = ReadName(obj, "unk_token", unk, special);
        pad = ReadName(obj, "pad_token", pad, special);
        if (!obj.TryGetProperty("additional_special_tokens", out var extra) || extra.ValueKind == JsonValueKind.Null) return;
        if (extra.ValueKind != JsonValueKind.Array) { problems.Add($"{path}: \"additional_special_tokens\" must be a list"); return; }
        foreach (var item in extra.EnumerateArray())
            if (TokenContent(item) is { } content) special.Add(content);
            else problems.Add($"{path}: additional_special_tokens entry {item.GetRawText()} is not a token");
    }

    private static SpecialTokenName ReadName(JsonElement obj, string name, SpecialTokenName current, HashSet<string> special)
    {
        if (!obj.TryGetProperty(name, out var v)) return current;
        if (v.ValueKind == JsonValueKind.Null) return new SpecialTokenName(true, null);
        if (TokenContent(v) is not { } content) return current;
        special.Add(content);
        return new SpecialTokenName(true, content);
    }

    /// <summary>A token given as a plain string or as an AddedToken object <c>{"content": ...}</c>.</summary>
    private static string? TokenContent(JsonElement v) => v.ValueKind switch
    {
        JsonValueKind.String => v.GetString(),
        JsonValueKind.Object when v.TryGetProperty("content", out var c) && c.ValueKind == JsonValueKind.String => c.GetString(),
        _ => null,
    };
}

/// <summary>A bos/eos/unk/pad entry: absent (<see cref="Given"/> false), explicitly null (Qwen's <c>bos_token: null</c>), or a token.</summary>
internal readonly record struct SpecialTokenName(bool Given, string? Content);
