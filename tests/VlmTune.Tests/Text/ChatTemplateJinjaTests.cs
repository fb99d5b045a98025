using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using VlmTune.Tests.Support;
using VlmTune.Text;

namespace VlmTune.Tests.Text;

/// <summary>
/// Renders chat templates with @huggingface/jinja (the implementation transformers.js uses) through
/// tests/js/render-chat-template.mjs. Needs node and <c>npm ci --prefix tests/js</c>.
/// </summary>
internal static class JinjaRenderer
{
    public static string ScriptDir => Path.Combine(Fixtures.RepoRoot, "tests", "js");

    /// <summary>Why the renderer cannot run here, or null when it can.</summary>
    public static readonly Lazy<string?> Missing = new(() =>
    {
        if (FindNode() is null) return "node not found on PATH: install Node.js (18 or later) to run the chat template tests.";
        if (!Directory.Exists(Path.Combine(ScriptDir, "node_modules", "@huggingface", "jinja")))
            return $"@huggingface/jinja is not installed: run 'npm ci --prefix {ScriptDir}' to run the chat template tests.";
        return null;
    });

    private static string? FindNode() =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries)
            .Select(dir => Path.Combine(dir, "node")).FirstOrDefault(File.Exists);

    /// <param name="RawMessages">Messages as given (content as a list of parts, say) instead of <paramref name="Messages"/>.</param>
    public sealed record Case(string Template, IReadOnlyList<(string Role, string Content)> Messages, bool AddGenerationPrompt, string? BosToken, JsonArray? RawMessages = null);

    /// <summary>The rendering of every case, in order.</summary>
    public static string[] Render(IReadOnlyList<Case> cases)
    {
        if (Missing.Value is { } reason) throw new InvalidOperationException(reason);
        var json = new JsonArray(cases.Select(c => (JsonNode)new JsonObject
        {
            ["template"] = c.Template,
            ["messages"] = c.RawMessages?.DeepClone() ?? new JsonArray(c.Messages.Select(m => (JsonNode)new JsonObject { ["role"] = m.Role, ["content"] = m.Content }).ToArray()),
            ["add_generation_prompt"] = c.AddGenerationPrompt,
            ["bos_token"] = c.BosToken,
        }).ToArray());
        var file = Path.Combine(Path.GetTempPath(), $"vlmtune-jinja-{Guid.NewGuid():N}.json");
        File.WriteAllText(file, json.ToJsonString());
        try
        {
            var start = new ProcessStartInfo(FindNode()!, [Path.Combine(ScriptDir, "render-chat-template.mjs"), file])
            {
                RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = ScriptDir,
            };
            using var node = Process.Start(start)!;
            var stderr = node.StandardError.ReadToEndAsync();
            var stdout = node.StandardOutput.ReadToEnd();
            node.WaitForExit();
            if (node.ExitCode != 0) throw new InvalidOperationException($"node exited with {node.ExitCode}: {stderr.Result}");
            return JsonSerializer.Deserialize<string[]>(stdout)!;
        }
        finally { File.Delete(file); }
    }
}

/// <summary>
/// A fact that needs node and @huggingface/jinja (and the shared fixtures, if asked): skipped with the reason where
/// absent, except under CI where it runs (and fails).
/// </summary>
public sealed class JinjaFactAttribute : FactAttribute
{
    public JinjaFactAttribute(bool needsFixtures = false)
    {
        if (Fixtures.UnderCi) return;
        if (needsFixtures && !Fixtures.Available) Skip = Fixtures.MissingMessage;
        else if (JinjaRenderer.Missing.Value is { } reason) Skip = reason;
    }
}

/// <summary>Each template's exported chat_template, rendered by a real Jinja engine, gives our renderer's text.</summary>
public class ChatTemplateJinjaTests
{
    private static readonly ConversationTemplate[] Templates =
        [ConversationTemplate.InternLM2Chat, ConversationTemplate.Hermes2, ConversationTemplate.Phi3Chat, ConversationTemplate.InternVL25];

    /// <summary>Conversations in OpenAI/HF form: an optional system message, then user/assistant turns.</summary>
    private static readonly (string Role, string Content)[][] Conversations =
    [
        [("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2")],
        [("user", "<image>\nWhat is in the picture?")],
        [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke."), ("assistant", "Knock knock."), ("user", "Who's there?")],
        [("system", "You are \"terse\".\nIt's fine: a\\b {{ not jinja }}"), ("user", "请你讲一个梗。"), ("assistant", "好的：\n- 一\n- 二"), ("user", "  spaces  ")],
        [("system", ""), ("user", "Q")],
    ];

    /// <summary>Our rendering of an HF-style conversation; <paramref name="open"/> appends the generation prompt.</summary>
    private static string Ours(ConversationTemplate template, (string Role, string Content)[] conversation, bool open, string? defaultSystem = null)
    {
        string? system = conversation[0].Role == "system" ? conversation[0].Content : defaultSystem;
        var messages = conversation.Where((m, i) => !(i == 0 && m.Role == "system"))
            .Select(m => new ConversationMessage(m.Role == "user" ? ConversationRole.User : ConversationRole.Assistant, m.Content))
            .ToList();
        if (open) messages.Add(new ConversationMessage(ConversationRole.Assistant, null));
        return template.Render(messages, system);
    }

    [JinjaFact]
    public void RendersTheSameTextAsOurRendererForEveryTemplateAndConversation()
    {
        var cases = new List<JinjaRenderer.Case>();
        var expected = new List<string>();
        foreach (var template in Templates)
            foreach (var conversation in Conversations)
            {
                // Generation prompts; and the whole conversation with the last reply, as for training.
                cases.Add(new(template.HuggingFaceChatTemplate(bosToken: false), conversation, true, null));
                expected.Add(Ours(template, conversation, open: true));
                var answered = conversation.Append(("assistant", "Final answer.")).ToArray();
                cases.Add(new(template.HuggingFaceChatTemplate(bosToken: false), answered, false, null));
                expected.Add(Ours(template, answered, open: false));
            }

        var rendered = JinjaRenderer.Render(cases);
        for (var i = 0; i < cases.Count; i++) Assert.Equal(expected[i], rendered[i]);
    }

    /// <summary>
    /// Content as a list of parts (what transformers' processors pass to apply_chat_template): each image part becomes
    /// the layout's placeholder and a newline, text parts follow as written, so the text is that of the same message
    /// written as one string: <c>&lt;image&gt;</c> for the official layout, <c>&lt;IMG_CONTEXT&gt;</c>, which
    /// InternVLProcessor expands, for the hf layout.
    /// </summary>
    [JinjaFact]
    public void ImageAndTextPartsRenderAsTheLayoutsPlaceholderThenTheText()
    {
        static JsonNode Image() => new JsonObject { ["type"] = "image" };
        static JsonNode Text(string t) => new JsonObject { ["type"] = "text", ["text"] = t };
        var parts = new JsonArray
        {
            new JsonObject { ["role"] = "user", ["content"] = new JsonArray(Image(), Image(), Text("Compare the two pictures.")) },
            new JsonObject { ["role"] = "assistant", ["content"] = new JsonArray(Text("The first is "), Text("brighter.")) },
            new JsonObject { ["role"] = "user", ["content"] = new JsonArray(Text("And now?"), Image()) },
        };
        var cases = new List<JinjaRenderer.Case>();
        var expected = new List<string>();
        foreach (var template in Templates)
            foreach (var placeholder in new[] { ImagePlaceholders.Placeholder, SpecialTokens.ImgContext })
            {
                cases.Add(new(template.HuggingFaceChatTemplate(bosToken: false, imagePlaceholder: placeholder), [], true, null, parts));
                expected.Add(Ours(template, [("user", $"{placeholder}\n{placeholder}\nCompare the two pictures."), ("assistant", "The first is brighter."), ("user", $"And now?{placeholder}\n")], open: true));
            }
        var rendered = JinjaRenderer.Render(cases);
        for (var i = 0; i < cases.Count; i++) Assert.Equal(expected[i], rendered[i]);
    }

    [JinjaFact]
    public void EmitsBosFirstWhenTheTokenizerAddsItAndTheModelsSystemMessageByDefault()
    {
        var question = new[] { ("user", "Q") };
        var withSystem = new[] { ("system", "Given."), ("user", "Q") };
        const string custom = "Answer in English, 'briefly'.\nThanks.";
        var t = ConversationTemplate.InternLM2Chat;
        var rendered = JinjaRenderer.Render(
        [
            new(t.HuggingFaceChatTemplate(bosToken: true), question, true, "<s>"),
            new(t.HuggingFaceChatTemplate(bosToken: false, systemMessage: custom), question, true, "<s>"),
            new(t.HuggingFaceChatTemplate(bosToken: false, systemMessage: custom), withSystem, true, "<s>"),
        ]);
        Assert.Equal("<s>" + Ours(t, question, open: true), rendered[0]);
        Assert.Equal(Ours(t, question, open: true, defaultSystem: custom), rendered[1]);
        Assert.Equal(Ours(t, withSystem, open: true), rendered[2]);
    }

    [JinjaFact(needsFixtures: true)]
    public void TheExportedTemplateTokenizesToTheGoldenChatPromptIds()
    {
        // The golden text_only case rendered by the exported template, then tokenized without special tokens as
        // vLLM does for chat: the ids model.chat() builds.
        var golden = Fixtures.Golden.GetProperty("cases").GetProperty("text_only");
        var history = golden.GetProperty("history").EnumerateArray().SelectMany(h => new[] { ("user", h[0].GetString()!), ("assistant", h[1].GetString()!) });
        (string, string)[] conversation = [("system", golden.GetProperty("system").GetString()!), .. history, ("user", golden.GetProperty("question").GetString()!)];
        var template = ConversationTemplate.InternLM2Chat.HuggingFaceChatTemplate(bosToken: true);

        var text = JinjaRenderer.Render([new(template, conversation, true, "<s>")])[0];

        var tokenizer = SentencePieceTokenizerTests.Tokenizer;
        Assert.Equal(golden.GetProperty("prompt_ids").EnumerateArray().Select(e => e.GetInt32()), tokenizer.Encode(text, addBos: false));
    }
}
