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
/// How training labels are placed: the preprocess function of InternVL's <c>internvl/train/dataset.py</c> that the
/// official fine-tune script (<c>internvl_chat_finetune.py</c>, <c>get_preprocess_function</c>) picks for a template.
/// <see cref="ConversationTokenizer"/> documents each one.
/// </summary>
public enum TrainingLabelStyle
{
    /// <summary><c>preprocess_internlm</c>: the whole text tokenized once, spans measured by splitting at the assistant role; values stripped.</summary>
    InternLM,
    /// <summary><c>preprocess_mpt</c>: spans measured per user+reply round split at the separator; no BOS assumed.</summary>
    Mpt,
    /// <summary><c>preprocess_phi3</c>: as <see cref="Mpt"/> with the offsets of Phi-3's tokenizer (BOS and a lone "▁" before a leading special token).</summary>
    Phi3,
    /// <summary><c>preprocess_internvl2_5</c>: every turn tokenized on its own and the ids concatenated; no mismatch check.</summary>
    InternVL25,
}

/// <summary>
/// A chat prompt format, as InternVL's <c>conversation.py</c> templates of the MPT separator style (every template the
/// released InternVL2 / 2.5 / 3 / 3.5 checkpoints name):
/// <code>
/// system_template(system_message) + sep
/// for each message:  role + message + sep     (a null/empty message: role alone, the model continues there)
/// </code>
/// For <c>internlm2-chat</c> that is <c>&lt;|im_start|&gt;system\n…&lt;|im_end|&gt;&lt;|im_start|&gt;user\n…&lt;|im_end|&gt;&lt;|im_start|&gt;assistant\n</c>
/// — note: no newline after <c>&lt;|im_end|&gt;</c>, unlike <c>internvl2_5</c> and the ChatML of the released tokenizer_config.json.
/// </summary>
/// <param name="Name">Name used by <c>config.json</c>'s <c>template</c>.</param>
/// <param name="SystemTemplate">Where <c>{system_message}</c> is replaced by the system message.</param>
/// <param name="SystemMessage">Default system message (a model's <c>config.system_message</c> overrides it).</param>
/// <param name="UserRole">Prefix of a user message.</param>
/// <param name="AssistantRole">Prefix of an assistant message; the prompt for generation ends with it.</param>
/// <param name="Separator">Ends the system prompt and every message.</param>
/// <param name="StopTokens">Tokens that end generation (<c>model.chat()</c> stops at <c>sep.strip()</c>).</param>
/// <param name="Labels">Which official preprocess function places the training labels.</param>
/// <param name="JinjaChatTemplate">
/// The Hugging Face <c>chat_template</c> rendering the same text as <see cref="Render"/>; it reads the variable
/// <c>default_system_message</c>, which <see cref="HuggingFaceChatTemplate"/> sets. Null: none is exported.
/// </param>
public sealed record ConversationTemplate(
    string Name,
    string SystemTemplate,
    string SystemMessage,
    string UserRole,
    string AssistantRole,
    string Separator,
    IReadOnlyList<string> StopTokens,
    TrainingLabelStyle Labels = TrainingLabelStyle.InternLM,
    string? JinjaChatTemplate = null)
{
    /// <summary>The system message of every InternVL2 template (kept by InternVL for benchmark stability).</summary>
    public const string InternVL2SystemMessage = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。";

    /// <summary>The system message of <c>internvl2_5</c> (InternVL2.5, 3 and 3.5).</summary>
    public const string InternVL25SystemMessage = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。";

    /// <summary>InternVL2-2B/8B/26B and InternVL2-Llama3-76B (see docs/model.md); trained with <c>preprocess_internlm</c>.</summary>
    public static ConversationTemplate InternLM2Chat { get; } = WithMptJinja(new(
        Name: "internlm2-chat",
        SystemTemplate: "<|im_start|>system\n{system_message}",
        SystemMessage: InternVL2SystemMessage,
        UserRole: "<|im_start|>user\n",
        AssistantRole: "<|im_start|>assistant\n",
        Separator: "<|im_end|>",
        StopTokens: ["<|im_end|>"],
        Labels: TrainingLabelStyle.InternLM));

    /// <summary>
    /// InternVL2-1B (Qwen2) and InternVL2-40B (Yi): the same text as <c>internlm2-chat</c>; only the training labels
    /// differ (<c>preprocess_mpt</c>, made for tokenizers without BOS). conversation.py's <c>stop_str</c>
    /// <c>&lt;|endoftext|&gt;</c> is not used by <c>model.chat()</c>.
    /// </summary>
    public static ConversationTemplate Hermes2 { get; } = InternLM2Chat with
    {
        Name = "Hermes-2",
        Labels = TrainingLabelStyle.Mpt,
    };

    /// <summary>InternVL2-4B (Phi-3-mini); trained with <c>preprocess_phi3</c>.</summary>
    public static ConversationTemplate Phi3Chat { get; } = WithMptJinja(new(
        Name: "phi3-chat",
        SystemTemplate: "<|system|>\n{system_message}",
        SystemMessage: InternVL2SystemMessage,
        UserRole: "<|user|>\n",
        AssistantRole: "<|assistant|>\n",
        Separator: "<|end|>",
        StopTokens: ["<|end|>"],
        Labels: TrainingLabelStyle.Phi3));

    /// <summary>Every InternVL2.5, InternVL3 and InternVL3.5 dense checkpoint; trained with <c>preprocess_internvl2_5</c>.</summary>
    public static ConversationTemplate InternVL25 { get; } = WithMptJinja(new(
        Name: "internvl2_5",
        SystemTemplate: "<|im_start|>system\n{system_message}",
        SystemMessage: InternVL25SystemMessage,
        UserRole: "<|im_start|>user\n",
        AssistantRole: "<|im_start|>assistant\n",
        Separator: "<|im_end|>\n",
        StopTokens: ["<|im_end|>"],
        Labels: TrainingLabelStyle.InternVL25));

    /// <summary>The template with the Jinja <c>chat_template</c> generated from its own MPT strings.</summary>
    private static ConversationTemplate WithMptJinja(ConversationTemplate t) =>
        t with { JinjaChatTemplate = ChatTemplates.Mpt(t.SystemTemplate, t.UserRole, t.AssistantRole, t.Separator) };

    private static readonly Dictionary<string, ConversationTemplate> Registry = new(StringComparer.Ordinal)
    {
        [InternLM2Chat.Name] = InternLM2Chat,
        [Hermes2.Name] = Hermes2,
        [Phi3Chat.Name] = Phi3Chat,
        [InternVL25.Name] = InternVL25,
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
        if (TryGet(name, out var template)) return template;
        throw new VlmTuneException($"Unknown conversation template '{name}'. Known templates: {string.Join(", ", KnownNames)}. " +
                                   "Set \"template\" in the model's config.json to one of them, or register the template.");
    }

    /// <summary>The template named <paramref name="name"/>, if one is registered.</summary>
    public static bool TryGet(string? name, [System.Diagnostics.CodeAnalysis.MaybeNullWhen(false)] out ConversationTemplate template)
    {
        template = null;
        lock (Registry) return name is not null && Registry.TryGetValue(name, out template);
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

    /// <summary>
    /// The <c>chat_template</c> for an exported folder's tokenizer_config.json. Rendered with a system message first,
    /// it gives <see cref="Render"/>'s text (with the default system message when the first message is not a system
    /// one), plus <c>bos_token</c> in front when <paramref name="bosToken"/>: engines (vLLM, LMDeploy) tokenize the
    /// rendered text without adding special tokens, so the template must emit the BOS the model was trained with.
    /// </summary>
    /// <param name="bosToken">Whether the tokenizer adds BOS (InternLM2, Llama 3, Phi-3: yes; Qwen: no).</param>
    /// <param name="systemMessage">The model's <c>config.system_message</c>; null keeps the template's.</param>
    /// <exception cref="VlmTuneException">The template has no <see cref="JinjaChatTemplate"/>.</exception>
    /// <param name="imagePlaceholder">What an image part of a message (content as a list of parts, as transformers'
    /// processors pass it) becomes, followed by a newline: <see cref="ImagePlaceholders.Placeholder"/> for the official layout
    /// (its consumers expand it), <c>&lt;IMG_CONTEXT&gt;</c> for the hf layout (InternVLProcessor expands that one).</param>
    public string HuggingFaceChatTemplate(bool bosToken, string? systemMessage = null, string imagePlaceholder = ImagePlaceholders.Placeholder)
    {
        if (JinjaChatTemplate is null)
            throw new VlmTuneException($"The conversation template '{Name}' has no Hugging Face chat template to export.");
        var header = "{%- set default_system_message = " + ChatTemplates.StringLiteral(systemMessage ?? SystemMessage) + " -%}\n"
                     + "{%- set image_placeholder = " + ChatTemplates.StringLiteral(imagePlaceholder) + " -%}\n";
        return header + (bosToken ? "{{- bos_token -}}\n" : "") + JinjaChatTemplate;
    }
}

/// <summary>
/// The Jinja <c>chat_template</c> of each template: the MPT rendering of conversation.py in Jinja, checked against
/// <see cref="ConversationTemplate.Render"/> with a real Jinja implementation (tests/js). <c>{%-</c>/<c>-%}</c> trim
/// the layout whitespace, so only the quoted strings reach the output.
/// </summary>
internal static class ChatTemplates
{
    /// <summary>
    /// conversation.py's MPT rendering (the system prompt, then role + message + separator for every message) as a Jinja
    /// <c>chat_template</c>, generated from a template's own strings so the two renderings cannot drift apart.
    /// </summary>
    public static string Mpt(string systemTemplate, string userRole, string assistantRole, string separator)
    {
        const string Placeholder = "{system_message}";
        int at = systemTemplate.IndexOf(Placeholder, StringComparison.Ordinal);
        // As Render: a system template without the placeholder is written as it is, without the message.
        string system = at < 0
            ? StringLiteral(systemTemplate + separator)
            : $"{StringLiteral(systemTemplate[..at])} + system_message + {StringLiteral(systemTemplate[(at + Placeholder.Length)..] + separator)}";
        return $$$"""
            {%- if messages and messages[0]['role'] == 'system' -%}
                {%- set system_message = messages[0]['content'] -%}
                {%- set loop_messages = messages[1:] -%}
            {%- else -%}
                {%- set system_message = default_system_message -%}
                {%- set loop_messages = messages -%}
            {%- endif -%}
            {{- {{{system}}} -}}
            {%- for message in loop_messages -%}
                {%- if message['role'] == 'user' -%}
                    {{- {{{StringLiteral(userRole)}}} -}}
                {%- elif message['role'] == 'assistant' -%}
                    {{- {{{StringLiteral(assistantRole)}}} -}}
                {%- else -%}
                    {{- raise_exception('Only the first message may be a system message; the others are from the user or the assistant.') -}}
                {%- endif -%}
                {%- if message['content'] is string -%}
                    {%- if message['content'] -%}
                        {{- message['content'] + {{{StringLiteral(separator)}}} -}}
                    {%- endif -%}
                {%- elif message['content'] -%}
                    {%- for part in message['content'] -%}
                        {%- if part['type'] == 'image' -%}
                            {{- image_placeholder + '\n' -}}
                        {%- elif part['type'] == 'text' -%}
                            {{- part['text'] -}}
                        {%- else -%}
                            {{- raise_exception('Only text and image parts are supported in a message.') -}}
                        {%- endif -%}
                    {%- endfor -%}
                    {{- {{{StringLiteral(separator)}}} -}}
                {%- endif -%}
            {%- endfor -%}
            {%- if add_generation_prompt -%}
                {{- {{{StringLiteral(assistantRole)}}} -}}
            {%- endif -%}
            """;
    }

    /// <summary>A single-quoted Jinja string literal of <paramref name="value"/> (Jinja2 and @huggingface/jinja read the same escapes).</summary>
    public static string StringLiteral(string value)
    {
        var s = new StringBuilder(value.Length + 2).Append('\'');
        foreach (var c in value)
            s.Append(c switch
            {
                '\\' => @"\\",
                '\'' => @"\'",
                '\n' => @"\n",
                '\r' => @"\r",
                '\t' => @"\t",
                _ => c.ToString(),
            });
        return s.Append('\'').ToString();
    }
}
