using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using VlmTune.Text;

namespace VlmTune.Tests.Support;

/// <summary>Which Qwen's special tokens a folder has: the first 3 (Qwen2), 22 (Qwen2.5) or 26 (Qwen3) of Qwen3's list.</summary>
public enum QwenFlavor
{
    /// <summary>Qwen2 (InternVL2-1B): ids 151643–151645, InternVL's tokens from 151646.</summary>
    Qwen2,

    /// <summary>Qwen2.5 (InternVL2.5, InternVL3): ids 151643–151664, InternVL's tokens from 151665.</summary>
    Qwen25,

    /// <summary>Qwen3 (InternVL3.5): ids 151643–151668, InternVL's tokens from 151669.</summary>
    Qwen3,
}

/// <summary>
/// Writes tokenizer folders laid out as the released InternVL checkpoints ship them, from the shared tokenizer fixtures
/// (<c>shared/fixtures/tokenizers</c>): what a model test needs beside its config.json and weights.
/// </summary>
public static class TokenizerFolders
{
    /// <summary>The Qwen3 <c>tokenizer.json</c> (vocabulary, merges, and Qwen's 26 special tokens).</summary>
    public static string QwenTokenizerJson => Path.Combine(Fixtures.Require(), "tokenizers", "qwen3", "tokenizer.json");

    /// <summary>The Llama 2 folder (<c>tokenizer.model</c>, <c>tokenizer_config.json</c>: legacy, add_bos_token).</summary>
    public static string Llama2Dir => Path.Combine(Fixtures.Require(), "tokenizers", "llama2");

    private static readonly Lazy<(JsonObject Vocab, List<string> Merges, List<JsonObject> Added)> Qwen = new(ReadQwen);

    /// <summary>
    /// Writes an InternVL-style Qwen tokenizer folder into <paramref name="dir"/> (created if needed): <c>vocab.json</c>
    /// (= <c>model.vocab</c>), <c>merges.txt</c> (<c>#version: 0.2</c>, then each merge as "left right"),
    /// <c>added_tokens.json</c>, <c>tokenizer_config.json</c> (<c>Qwen2Tokenizer</c>, <c>added_tokens_decoder</c>,
    /// <c>bos_token: null</c>, <c>eos_token: &lt;|im_end|&gt;</c>, <c>pad_token: &lt;|endoftext|&gt;</c>) and
    /// <c>special_tokens_map.json</c>. The flavor's Qwen special tokens come first, then InternVL's
    /// <c>&lt;img&gt;</c>, <c>&lt;/img&gt;</c>, <c>&lt;IMG_CONTEXT&gt;</c>, <c>&lt;quad&gt;</c>, <c>&lt;/quad&gt;</c>,
    /// <c>&lt;ref&gt;</c>, <c>&lt;/ref&gt;</c>, <c>&lt;box&gt;</c>, <c>&lt;/box&gt;</c> (special).
    /// </summary>
    /// <summary>
    /// Only the two large files of a released Qwen folder (<c>vocab.json</c>, <c>merges.txt</c>), derived from the shared
    /// <c>tokenizer.json</c>: what a checkpoint folder whose small tokenizer files are committed still needs.
    /// </summary>
    public static void WriteQwenVocabAndMerges(string dir)
    {
        var (vocab, merges, _) = Qwen.Value;
        File.WriteAllText(Path.Combine(dir, "vocab.json"), vocab.ToJsonString());
        var mergesText = new StringBuilder("#version: 0.2\n");
        foreach (var merge in merges) mergesText.Append(merge).Append('\n');
        File.WriteAllText(Path.Combine(dir, "merges.txt"), mergesText.ToString());
    }

    public static void WriteQwen(string dir, QwenFlavor flavor)
    {
        Directory.CreateDirectory(dir);
        var (vocab, merges, qwenAdded) = Qwen.Value;
        var lastBaseId = flavor switch { QwenFlavor.Qwen2 => 151645, QwenFlavor.Qwen25 => 151664, _ => 151668 };
        var added = qwenAdded.Where(t => (int)t["id"]! <= lastBaseId).Select(t => (JsonObject)t.DeepClone()).ToList();
        for (var i = 0; i < SpecialTokens.InternVL.Count; i++)
            added.Add(AddedToken(lastBaseId + 1 + i, SpecialTokens.InternVL[i], special: true));

        WriteQwenVocabAndMerges(dir);

        var addedJson = new JsonObject();
        foreach (var t in added.OrderBy(t => (string)t["content"]!, StringComparer.Ordinal)) addedJson[(string)t["content"]!] = (int)t["id"]!;
        File.WriteAllText(Path.Combine(dir, "added_tokens.json"), addedJson.ToJsonString(Indented));

        var decoder = new JsonObject();
        foreach (var t in added)
        {
            var entry = (JsonObject)t.DeepClone();
            entry.Remove("id");
            decoder[((int)t["id"]!).ToString()] = entry;
        }
        // Qwen's own special tokens past <|im_end|> are additional specials (as Qwen ships them), then InternVL's.
        var additional = new JsonArray([.. added.Where(t => (bool)t["special"]! && (int)t["id"]! > 151643)
            .Select(t => (JsonNode)(string)t["content"]!)]);
        var config = new JsonObject
        {
            ["add_bos_token"] = false,
            ["add_prefix_space"] = false,
            ["added_tokens_decoder"] = decoder,
            ["additional_special_tokens"] = additional.DeepClone(),
            ["bos_token"] = null,
            ["clean_up_tokenization_spaces"] = false,
            ["eos_token"] = "<|im_end|>",
            ["errors"] = "replace",
            ["model_max_length"] = 16384,
            ["pad_token"] = "<|endoftext|>",
            ["split_special_tokens"] = false,
            ["tokenizer_class"] = "Qwen2Tokenizer",
            ["unk_token"] = null,
        };
        File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), config.ToJsonString(Indented));
        var map = new JsonObject
        {
            ["additional_special_tokens"] = additional,
            ["eos_token"] = TokenObject("<|im_end|>"),
            ["pad_token"] = TokenObject("<|endoftext|>"),
        };
        File.WriteAllText(Path.Combine(dir, "special_tokens_map.json"), map.ToJsonString(Indented));
    }

    /// <summary>Phi-3-mini's added tokens from 32000, with their <c>rstrip</c> (InternVL2-4B's LLM).</summary>
    public static IReadOnlyList<string> Phi3AddedTokens { get; } =
    [
        "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>", "<|placeholder4|>",
        "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
    ];

    /// <summary>
    /// Writes a Phi-3-mini-style folder into <paramref name="dir"/>: Llama 2's <c>tokenizer.model</c> and a
    /// <c>tokenizer_config.json</c> as microsoft/Phi-3-mini-128k-instruct's (<c>LlamaTokenizer</c>, <c>legacy: false</c>,
    /// <c>&lt;/s&gt;</c> not special and rstrip, <see cref="Phi3AddedTokens"/> special and rstrip except
    /// <c>&lt;|endoftext|&gt;</c>, eos and pad <c>&lt;|endoftext|&gt;</c>), plus <c>special_tokens_map.json</c>.
    /// </summary>
    /// <param name="addBosToken">The checkpoint's <c>add_bos_token</c> (true in Phi-3-mini's first release, false in later ones).</param>
    /// <param name="internVLTokens">Also add InternVL's tokens after 32010, as an InternVL2-4B folder has them.</param>
    public static void WritePhi3(string dir, bool addBosToken = true, bool internVLTokens = false)
    {
        Directory.CreateDirectory(dir);
        File.Copy(Path.Combine(Llama2Dir, "tokenizer.model"), Path.Combine(dir, "tokenizer.model"), overwrite: true);
        var decoder = new JsonObject
        {
            ["0"] = Strip(AddedToken(0, "<unk>", special: true)),
            ["1"] = Strip(AddedToken(1, "<s>", special: true)),
            ["2"] = Strip(AddedToken(2, "</s>", special: false, rstrip: true)),
        };
        for (var i = 0; i < Phi3AddedTokens.Count; i++)
            decoder[(32000 + i).ToString()] = Strip(AddedToken(32000 + i, Phi3AddedTokens[i], special: true, rstrip: i != 0));
        if (internVLTokens)
            for (var i = 0; i < SpecialTokens.InternVL.Count; i++)
                decoder[(32011 + i).ToString()] = Strip(AddedToken(32011 + i, SpecialTokens.InternVL[i], special: true));
        var config = new JsonObject
        {
            ["add_bos_token"] = addBosToken,
            ["add_eos_token"] = false,
            ["added_tokens_decoder"] = decoder,
            ["bos_token"] = "<s>",
            ["clean_up_tokenization_spaces"] = false,
            ["eos_token"] = "<|endoftext|>",
            ["legacy"] = false,
            ["model_max_length"] = 131072,
            ["pad_token"] = "<|endoftext|>",
            ["padding_side"] = "left",
            ["sp_model_kwargs"] = new JsonObject(),
            ["tokenizer_class"] = "LlamaTokenizer",
            ["unk_token"] = "<unk>",
            ["use_default_system_prompt"] = false,
        };
        File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), config.ToJsonString(Indented));
        var map = new JsonObject
        {
            ["bos_token"] = TokenObject("<s>"),
            ["eos_token"] = TokenObject("<|endoftext|>"),
            ["pad_token"] = TokenObject("<|endoftext|>"),
            ["unk_token"] = TokenObject("<unk>"),
        };
        File.WriteAllText(Path.Combine(dir, "special_tokens_map.json"), map.ToJsonString(Indented));
    }

    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    private static (JsonObject, List<string>, List<JsonObject>) ReadQwen()
    {
        var root = JsonNode.Parse(File.ReadAllBytes(QwenTokenizerJson))!.AsObject();
        var model = root["model"]!.AsObject();
        var merges = model["merges"]!.AsArray()
            .Select(m => m is JsonArray pair ? $"{(string)pair[0]!} {(string)pair[1]!}" : (string)m!).ToList();
        var added = root["added_tokens"]!.AsArray().Select(t => (JsonObject)t!.DeepClone()).ToList();
        return ((JsonObject)model["vocab"]!.DeepClone(), merges, added);
    }

    private static JsonObject AddedToken(int id, string content, bool special, bool rstrip = false) => new()
    {
        ["id"] = id,
        ["content"] = content,
        ["single_word"] = false,
        ["lstrip"] = false,
        ["rstrip"] = rstrip,
        ["normalized"] = false,
        ["special"] = special,
    };

    private static JsonObject Strip(JsonObject token)
    {
        token.Remove("id");
        return token;
    }

    private static JsonObject TokenObject(string content) => new()
    {
        ["content"] = content,
        ["lstrip"] = false,
        ["normalized"] = false,
        ["rstrip"] = false,
        ["single_word"] = false,
    };
}
