using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace VlmTune.Text;

/// <summary>
/// The <c>chat_template</c> of an exported model folder's tokenizer_config.json. LMDeploy and vLLM build chat prompts
/// from the tokenizer's template only, and the released InternVL2 folders carry a ChatML one that differs from what
/// the model was trained on (newlines after <c>&lt;|im_end|&gt;</c>), so exports carry the template's own
/// (<see cref="ConversationTemplate.HuggingFaceChatTemplate"/>).
/// </summary>
public static class ChatTemplateExport
{
    public const string TokenizerConfigFile = "tokenizer_config.json";
    /// <summary>The processor's (and recent transformers' tokenizer's) chat template file of an hf-layout folder.</summary>
    public const string JinjaFile = "chat_template.jinja";

    private static readonly JsonSerializerOptions Indented = new()
    {
        WriteIndented = true,
        Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping,   // keep non-ASCII text as written, like transformers' ensure_ascii=False
    };

    /// <summary>
    /// <paramref name="tokenizerConfigJson"/> with <c>chat_template</c> set to the template's, every other key kept as
    /// it is; null when it already holds exactly that template.
    /// </summary>
    /// <param name="systemMessage">The model's <c>config.system_message</c>; null keeps the template's default.</param>
    /// <param name="path">Names the file in error messages.</param>
    /// <param name="hfLayout">For the hf layout's folder: image parts become <c>&lt;IMG_CONTEXT&gt;</c> and the tokenizer
    /// names its image tokens (<see cref="HfImageTokens"/>), which transformers' InternVLProcessor reads.</param>
    /// <exception cref="VlmTuneException">The JSON is invalid or not an object, or the template has no chat template.</exception>
    public static string? WithChatTemplate(string tokenizerConfigJson, ConversationTemplate template, string? systemMessage, string path, bool hfLayout = false)
    {
        ArgumentNullException.ThrowIfNull(template);
        JsonObject config;
        try
        {
            config = JsonNode.Parse(tokenizerConfigJson) as JsonObject
                     ?? throw new VlmTuneException($"{path}: expected a JSON object.");
        }
        catch (JsonException e) { throw new VlmTuneException($"{path}: invalid JSON: {e.Message}"); }

        var chatTemplate = template.HuggingFaceChatTemplate(AddsBos(config), systemMessage, hfLayout ? SpecialTokens.ImgContext : ImagePlaceholders.Placeholder);
        bool changed = !(config["chat_template"] is JsonValue current && current.TryGetValue<string>(out var existing) && existing == chatTemplate);
        config["chat_template"] = chatTemplate;
        if (hfLayout)
        {
            var named = config["extra_special_tokens"] as JsonObject ?? new JsonObject();
            foreach (var (key, token) in HfImageTokens)
                if (named[key] is not JsonValue v || !v.TryGetValue<string>(out var s) || s != token) { named[key] = token; changed = true; }
            config["extra_special_tokens"] = named;
        }
        return changed ? config.ToJsonString(Indented) + "\n" : null;
    }

    /// <summary>
    /// The tokenizer attributes transformers' InternVLProcessor reads (tokenizer.start_image_token, …, from
    /// tokenizer_config.json's <c>extra_special_tokens</c>), as the released -hf folders name them.
    /// </summary>
    public static readonly IReadOnlyList<(string Key, string Token)> HfImageTokens =
    [
        ("start_image_token", SpecialTokens.ImgStart), ("end_image_token", SpecialTokens.ImgEnd),
        ("context_image_token", SpecialTokens.ImgContext), ("video_token", "<video>"),
    ];

    /// <summary>
    /// Whether the tokenizer puts BOS first: <c>add_bos_token</c> when given, else whether it has a <c>bos_token</c>
    /// (the default of the sentencepiece tokenizers of InternLM2, Llama and Phi-3; Qwen's has none).
    /// </summary>
    internal static bool AddsBos(JsonObject tokenizerConfig)
    {
        if (tokenizerConfig["add_bos_token"] is JsonValue add && add.GetValueKind() is JsonValueKind.True or JsonValueKind.False)
            return add.GetValue<bool>();
        return tokenizerConfig["bos_token"] switch
        {
            JsonValue v when v.TryGetValue<string>(out var s) => !string.IsNullOrEmpty(s),
            JsonObject o => o["content"] is JsonValue c && c.TryGetValue<string>(out var content) && content.Length > 0,
            _ => false,
        };
    }
}
