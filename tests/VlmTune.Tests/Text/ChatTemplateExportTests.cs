using System.Text.Json.Nodes;
using VlmTune.Tests.Support;
using VlmTune.Text;

namespace VlmTune.Tests.Text;

/// <summary>The chat_template written into an exported folder's tokenizer_config.json.</summary>
public class ChatTemplateExportTests
{
    private static JsonObject Parse(string json) => JsonNode.Parse(json)!.AsObject();

    [FixtureFact]
    public void ReplacesTheReleasedChatMLTemplateAndKeepsEveryOtherKey()
    {
        var path = Path.Combine(Fixtures.TinyModel, "tokenizer_config.json");
        var original = File.ReadAllText(path);

        var updated = ChatTemplateExport.WithChatTemplate(original, ConversationTemplate.InternLM2Chat, null, path)!;

        var before = Parse(original);
        var after = Parse(updated);
        Assert.Equal(ConversationTemplate.InternLM2Chat.HuggingFaceChatTemplate(bosToken: true), after["chat_template"]!.GetValue<string>());
        Assert.Equal(before.Select(p => p.Key), after.Select(p => p.Key));      // same keys, same order
        before["chat_template"] = after["chat_template"]!.DeepClone();
        Assert.True(JsonNode.DeepEquals(before, after));
        Assert.Null(ChatTemplateExport.WithChatTemplate(updated, ConversationTemplate.InternLM2Chat, null, path));   // already there
    }

    [Fact]
    public void AddsTheTemplateWhenMissingWithTheModelsSystemMessageAndBosOnlyWhenTheTokenizerAddsIt()
    {
        const string qwen = """{"add_prefix_space": false, "bos_token": null, "eos_token": "<|im_end|>", "model_max_length": 1000000000000000019884624838656}""";
        var updated = Parse(ChatTemplateExport.WithChatTemplate(qwen, ConversationTemplate.InternVL25, "Custom.", "q/tokenizer_config.json")!);
        Assert.Equal(ConversationTemplate.InternVL25.HuggingFaceChatTemplate(bosToken: false, systemMessage: "Custom."), updated["chat_template"]!.GetValue<string>());
        Assert.Contains("1000000000000000019884624838656", updated.ToJsonString());   // big numbers kept as written

        Assert.True(ChatTemplateExport.AddsBos(Parse("""{"bos_token": "<s>"}""")));
        Assert.True(ChatTemplateExport.AddsBos(Parse("""{"bos_token": {"content": "<|begin_of_text|>"}}""")));
        Assert.False(ChatTemplateExport.AddsBos(Parse("""{"bos_token": "<|startoftext|>", "add_bos_token": false}""")));
        Assert.True(ChatTemplateExport.AddsBos(Parse("""{"bos_token": null, "add_bos_token": true}""")));
        Assert.False(ChatTemplateExport.AddsBos(Parse("{}")));
    }

    [Fact]
    public void InvalidFilesAreNamed()
    {
        var e = Assert.Throws<VlmTuneException>(() => ChatTemplateExport.WithChatTemplate("{not json", ConversationTemplate.Hermes2, null, "m/tokenizer_config.json"));
        Assert.StartsWith("m/tokenizer_config.json: invalid JSON", e.Message);
        Assert.Contains("expected a JSON object", Assert.Throws<VlmTuneException>(() =>
            ChatTemplateExport.WithChatTemplate("[]", ConversationTemplate.Hermes2, null, "m/tokenizer_config.json")).Message);
        var custom = ConversationTemplate.InternLM2Chat with { Name = "custom", JinjaChatTemplate = null };
        Assert.Contains("'custom' has no Hugging Face chat template", Assert.Throws<VlmTuneException>(() =>
            ChatTemplateExport.WithChatTemplate("{}", custom, null, "m/tokenizer_config.json")).Message);
    }
}
