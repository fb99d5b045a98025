using System.Text.Json;
using VlmTune.Tests.Support;
using VlmTune.Text;

namespace VlmTune.Tests.Text;

public class ChatPromptTests
{
    private static TextTokenizer Tokenizer => SentencePieceTokenizerTests.Tokenizer;
    private static readonly ConversationTemplate Template = ConversationTemplate.InternLM2Chat;
    private const int NumImageToken = 256;

    public static TheoryData<string> GoldenCases() => new("one_image", "text_only", "two_images");

    [FixtureTheory]
    [MemberData(nameof(GoldenCases))]
    public void BuildsTheGoldenPromptIdsExactly(string name)
    {
        var golden = Fixtures.Golden.GetProperty("cases").GetProperty(name);
        var tiles = golden.GetProperty("images").EnumerateArray()
            .Select(n => Fixtures.Golden.GetProperty("images").GetProperty(n.GetString()!).GetProperty("tiles").GetInt32())
            .ToArray();
        var history = golden.GetProperty("history").EnumerateArray()
            .Select(t => new ChatTurn(t[0].GetString()!, t[1].GetString()!)).ToArray();
        var expected = golden.GetProperty("prompt_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();

        var prompt = ChatPrompt.Build(Tokenizer, Template, golden.GetProperty("question").GetString()!, tiles, NumImageToken,
            history, golden.GetProperty("system").GetString());

        Assert.Equal(expected.Length, prompt.InputIds.Length);
        Assert.Equal(expected, prompt.InputIds);
        Assert.Equal(NumImageToken * tiles.Sum(), prompt.InputIds.Count(id => id == Tokenizer.ImgContextId));
    }

    [Fact]
    public void DefaultSystemMessageIsTheInternVL2One()
    {
        Assert.Equal("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
            Template.SystemMessage);
        Assert.Equal(["<|im_end|>"], Template.StopTokens);
        Assert.Same(Template, ConversationTemplate.Get("internlm2-chat"));
    }

    [Fact]
    public void RendersTheTemplateWithoutNewlinesAfterTheSeparator()
    {
        var text = ChatPrompt.BuildText(Template, "Q2", [2], 1, [new ChatTurn("<image>\nQ1", "A1")], systemMessage: "S");
        Assert.Equal("<|im_start|>system\nS<|im_end|><|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nQ1<|im_end|>" +
                     "<|im_start|>assistant\nA1<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n", text);
    }

    [Fact]
    public void PrependsTheImagePlaceholderOnlyWithoutHistoryAndWithoutOne()
    {
        Assert.Contains("<|im_start|>user\n<img><IMG_CONTEXT></img>\nWhat?<|im_end|>",
            ChatPrompt.BuildText(Template, "What?", [1], 1, systemMessage: "S"));
        Assert.Contains("<|im_start|>user\nLook: <img><IMG_CONTEXT></img> What?<|im_end|>",
            ChatPrompt.BuildText(Template, "Look: <image> What?", [1], 1, systemMessage: "S"));
        Assert.Equal("<|im_start|>system\nS<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n",
            ChatPrompt.BuildText(Template, "Hi", [], 256, systemMessage: "S"));
    }

    [Fact]
    public void ReplacesPlaceholdersInOrderWithEachImagesTiles()
    {
        var text = ChatPrompt.BuildText(Template, "A <image> B <image>", [1, 3], 2, systemMessage: "S");
        Assert.Contains("A <img>" + string.Concat(Enumerable.Repeat("<IMG_CONTEXT>", 2)) + "</img> B <img>" +
                        string.Concat(Enumerable.Repeat("<IMG_CONTEXT>", 6)) + "</img><|im_end|>", text);
    }

    [Fact]
    public void PlaceholderCountMismatchIsAClearError()
    {
        var tooFew = Assert.Throws<VlmTuneException>(() => ChatPrompt.BuildText(Template, "Compare <image>", [1, 1], 256));
        Assert.Contains("1 '<image>' placeholder(s) but 2 image(s)", tooFew.Message);
        // with history, no placeholder is added: the images must be placed explicitly
        var none = Assert.Throws<VlmTuneException>(() => ChatPrompt.BuildText(Template, "And now?", [1], 256, [new ChatTurn("Hi", "Hello")]));
        Assert.Contains("0 '<image>' placeholder(s) but 1 image(s)", none.Message);
        var textOnly = Assert.Throws<VlmTuneException>(() => ChatPrompt.BuildText(Template, "<image> what", [], 256));
        Assert.Contains("1 '<image>' placeholder(s) but 0 image(s)", textOnly.Message);
        var zeroTiles = Assert.Throws<VlmTuneException>(() => ChatPrompt.BuildText(Template, "x", [0], 256));
        Assert.Contains("image 0", zeroTiles.Message);
    }

    [Fact]
    public void UnknownTemplateListsTheKnownOnes()
    {
        var e = Assert.Throws<VlmTuneException>(() => ConversationTemplate.Get("vicuna_v1.1"));
        Assert.Contains("vicuna_v1.1", e.Message);
        Assert.Contains("internlm2-chat", e.Message);
    }

    [Fact]
    public void RegisteredTemplatesAreFoundByName()
    {
        var custom = ConversationTemplate.InternLM2Chat with { Name = "test-custom-chat", SystemMessage = "Be brief." };
        ConversationTemplate.Register(custom);
        Assert.Same(custom, ConversationTemplate.Get("test-custom-chat"));
        Assert.StartsWith("<|im_start|>system\nBe brief.<|im_end|>", ChatPrompt.BuildText(custom, "Hi", [], 256));
    }

    [Fact]
    public void NumImageTokenOfInternVL2Is256()
    {
        Assert.Equal(256, ImagePlaceholders.NumImageToken(448, 14, 0.5));
        Assert.Equal(1024, ImagePlaceholders.NumImageToken(448, 14, 1.0));
    }
}
