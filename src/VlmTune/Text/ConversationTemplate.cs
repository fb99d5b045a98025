using System.Text;

namespace VlmTune.Text;

/// <summary>Who speaks a message of a conversation.</summary>
public enum ConversationRole
{
    User,
    Assistant,
}

/// <summary>One message of a conversation; a null or empty <see cref="Text"/> on the last assistant message opens the reply.</summary>
public readonly record struct ConversationMessage(ConversationRole Role, string? Text);

/// <summary>
/// A chat prompt format, as InternVL's <c>conversation.py</c> templates of the MPT separator style:
/// <code>
/// system_template(system_message) + sep
/// for each message:  role + message + sep     (a null/empty message: role alone, the model continues there)
/// </code>
/// For <c>internlm2-chat</c> that is <c>&lt;|im_start|&gt;system\n…&lt;|im_end|&gt;&lt;|im_start|&gt;user\n…&lt;|im_end|&gt;&lt;|im_start|&gt;assistant\n</c>
/// — note: no newline after <c>&lt;|im_end|&gt;</c>, unlike the ChatML of <c>tokenizer_config.json</c>.
/// </summary>
/// <param name="Name">Name used by <c>config.json</c>'s <c>template</c>.</param>
/// <param name="SystemTemplate">Where <c>{system_message}</c> is replaced by the system message.</param>
/// <param name="SystemMessage">Default system message (a model's <c>config.system_message</c> overrides it).</param>
/// <param name="UserRole">Prefix of a user message.</param>
/// <param name="AssistantRole">Prefix of an assistant message; the prompt for generation ends with it.</param>
/// <param name="Separator">Ends the system prompt and every message.</param>
/// <param name="StopTokens">Tokens that end generation (<c>model.chat()</c> stops at <c>sep.strip()</c>).</param>
public sealed record ConversationTemplate(
    string Name,
    string SystemTemplate,
    string SystemMessage,
    string UserRole,
    string AssistantRole,
    string Separator,
    IReadOnlyList<string> StopTokens)
{
    /// <summary>The template of InternVL2-2B/8B/26B and Mini-InternVL-Chat-2B (InternLM2-chat LLMs).</summary>
    public static ConversationTemplate InternLM2Chat { get; } = new(
        Name: "internlm2-chat",
        SystemTemplate: "<|im_start|>system\n{system_message}",
        SystemMessage: "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
        UserRole: "<|im_start|>user\n",
        AssistantRole: "<|im_start|>assistant\n",
        Separator: "<|im_end|>",
        StopTokens: ["<|im_end|>"]);

    private static readonly Dictionary<string, ConversationTemplate> Registry = new(StringComparer.Ordinal)
    {
        [InternLM2Chat.Name] = InternLM2Chat,
    };

    /// <summary>Names of the registered templates.</summary>
    public static IReadOnlyCollection<string> KnownNames
    {
        get { lock (Registry) return [.. Registry.Keys.Order(StringComparer.Ordinal)]; }
    }

    /// <summary>The template named <paramref name="name"/> (e.g. <c>config.json</c>'s <c>template</c>).</summary>
    /// <exception cref="VlmTuneException">No template has that name; the message lists the known ones.</exception>
    public static ConversationTemplate Get(string name)
    {
        lock (Registry)
            if (name is not null && Registry.TryGetValue(name, out var template)) return template;
        throw new VlmTuneException($"Unknown conversation template '{name}'. Known templates: {string.Join(", ", KnownNames)}. " +
                                   "Set \"template\" in the model's config.json to one of them, or register the template.");
    }

    /// <summary>Adds (or replaces) a template so <see cref="Get"/> finds it by name.</summary>
    public static void Register(ConversationTemplate template)
    {
        ArgumentNullException.ThrowIfNull(template);
        lock (Registry) Registry[template.Name] = template;
    }

    /// <summary>The role prefix of <paramref name="role"/>.</summary>
    public string RolePrefix(ConversationRole role) => role == ConversationRole.User ? UserRole : AssistantRole;

    /// <summary>The system prompt and separator that open every conversation.</summary>
    public string RenderSystem(string? systemMessage = null) =>
        SystemTemplate.Replace("{system_message}", systemMessage ?? SystemMessage) + Separator;

    /// <summary>
    /// The conversation as text (<c>get_prompt()</c>). Messages must alternate user, assistant, user, …; end with an
    /// assistant message whose text is null to get a prompt for generation.
    /// </summary>
    public string Render(IReadOnlyList<ConversationMessage> messages, string? systemMessage = null)
    {
        ArgumentNullException.ThrowIfNull(messages);
        var text = new StringBuilder(RenderSystem(systemMessage));
        for (var i = 0; i < messages.Count; i++)
        {
            var expected = i % 2 == 0 ? ConversationRole.User : ConversationRole.Assistant;
            if (messages[i].Role != expected)
                throw new VlmTuneException($"Conversation message {i} is from the {messages[i].Role.ToString().ToLowerInvariant()}, " +
                                           $"but messages must alternate user/assistant starting with the user (expected {expected.ToString().ToLowerInvariant()}).");
            text.Append(RolePrefix(messages[i].Role));
            // As conversation.py: an empty message is like None (role only, no separator).
            if (!string.IsNullOrEmpty(messages[i].Text)) text.Append(messages[i].Text).Append(Separator);
        }
        return text.ToString();
    }
}
