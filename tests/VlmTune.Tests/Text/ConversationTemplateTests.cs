using VlmTune.Text;

namespace VlmTune.Tests.Text;

/// <summary>The templates of conversation.py, rendered by hand from its MPT <c>get_prompt()</c>.</summary>
public class ConversationTemplateTests
{
    /// <summary>System "S", then Q1 → A1, Q2 → (generation).</summary>
    private static readonly ConversationMessage[] TwoTurns =
    [
        new(ConversationRole.User, "Q1"), new(ConversationRole.Assistant, "A1"),
        new(ConversationRole.User, "Q2"), new(ConversationRole.Assistant, null),
    ];

    public static TheoryData<string, string> HandCheckedRenderings() => new()
    {
        { "internlm2-chat", "<|im_start|>system\nS<|im_end|><|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>" +
                            "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n" },
        { "Hermes-2",       "<|im_start|>system\nS<|im_end|><|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>" +
                            "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n" },
        { "phi3-chat",      "<|system|>\nS<|end|><|user|>\nQ1<|end|><|assistant|>\nA1<|end|><|user|>\nQ2<|end|><|assistant|>\n" },
        { "internvl2_5",    "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n" +
                            "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n" },
    };

    [Theory]
    [MemberData(nameof(HandCheckedRenderings))]
    public void RendersATwoTurnConversationWithASystemMessageAsConversationPy(string name, string expected) =>
        Assert.Equal(expected, ConversationTemplate.Get(name).Render(TwoTurns, systemMessage: "S"));

    [Fact]
    public void EveryReleasedTemplateIsRegisteredWithItsSystemMessageStopTokenAndLabelStyle()
    {
        Assert.Subset(ConversationTemplate.KnownNames.ToHashSet(), new HashSet<string> { "Hermes-2", "internlm2-chat", "internvl2_5", "phi3-chat" });
        const string internVL2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。";
        const string internVL25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。";
        (string Name, string System, string Stop, TrainingLabelStyle Labels)[] expected =
        [
            ("internlm2-chat", internVL2, "<|im_end|>", TrainingLabelStyle.InternLM),
            ("Hermes-2", internVL2, "<|im_end|>", TrainingLabelStyle.Mpt),
            ("phi3-chat", internVL2, "<|end|>", TrainingLabelStyle.Phi3),
            ("internvl2_5", internVL25, "<|im_end|>", TrainingLabelStyle.InternVL25),
        ];
        foreach (var (name, system, stop, labels) in expected)
        {
            var template = ConversationTemplate.Get(name);
            Assert.Equal(name, template.Name);
            Assert.Equal(system, template.SystemMessage);
            Assert.Equal([stop], template.StopTokens);                 // model.chat(): eos = sep.strip()
            Assert.Equal(template.Separator.Trim(), stop);
            Assert.Equal(labels, template.Labels);
            Assert.NotNull(template.JinjaChatTemplate);
        }
        Assert.Same(ConversationTemplate.InternVL25, ConversationTemplate.Get("internvl2_5"));
    }

    [Fact]
    public void DefaultSystemMessageIsUsedUnlessOneIsGiven()
    {
        var t = ConversationTemplate.InternVL25;
        Assert.StartsWith("<|im_start|>system\n" + t.SystemMessage + "<|im_end|>\n<|im_start|>user\n", t.Render(TwoTurns));
        Assert.StartsWith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n", t.Render(TwoTurns, systemMessage: ""));
    }

    [Fact]
    public void UnknownTemplatesListTheKnownOnesAndTryGetDoesNotThrow()
    {
        var e = Assert.Throws<VlmTuneException>(() => ConversationTemplate.Get("llama3-chat"));
        Assert.Contains("Unknown conversation template 'llama3-chat'", e.Message);
        Assert.Contains("internvl2_5", e.Message);
        Assert.False(ConversationTemplate.TryGet("llama3-chat", out _));
        Assert.False(ConversationTemplate.TryGet(null, out _));
        Assert.True(ConversationTemplate.TryGet("phi3-chat", out var phi3));
        Assert.Same(ConversationTemplate.Phi3Chat, phi3);
    }

    [Fact]
    public void JinjaStringLiteralsEscapeQuotesBackslashesAndNewlines() =>
        Assert.Equal(@"'It\'s a \\ and\na 书生'", ChatTemplates.StringLiteral("It's a \\ and\na 书生"));
}
