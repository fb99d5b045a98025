using System.Text.Json;
using VlmTune.Tests.Support;
using VlmTune.Text;

namespace VlmTune.Tests.Text;

public class ConversationTokenizerTests
{
    private static TextTokenizer Tokenizer => SentencePieceTokenizerTests.Tokenizer;
    private const int Ignore = ConversationTokenizer.IgnoreTokenId;

    private static ConversationTokenizer Create(int maxLength = 4096, int numImageToken = 256) =>
        new(Tokenizer, ConversationTemplate.InternLM2Chat, numImageToken, maxLength);

    private static ConversationTurn Human(string v) => new(ConversationTurn.Human, v);
    private static ConversationTurn Gpt(string v) => new(ConversationTurn.Gpt, v);

    [FixtureFact]
    public void MatchesTheGoldenTrainSampleExactly()
    {
        var golden = Fixtures.Golden.GetProperty("train_sample");
        var turns = golden.GetProperty("conversations").EnumerateArray()
            .Select(t => new ConversationTurn(t.GetProperty("from").GetString()!, t.GetProperty("value").GetString()!)).ToArray();
        var tiles = Fixtures.Golden.GetProperty("images").GetProperty(golden.GetProperty("image").GetString()!).GetProperty("tiles").GetInt32();

        var sample = Create().Tokenize(turns, [tiles]);

        Assert.Equal(golden.GetProperty("input_ids").EnumerateArray().Select(e => e.GetInt32()), sample.InputIds);
        Assert.Equal(golden.GetProperty("labels").EnumerateArray().Select(e => e.GetInt32()), sample.Labels);
        Assert.False(sample.Truncated);
        Assert.False(sample.LabelsMaskedForMismatch);
    }

    [FixtureFact]
    public void LearnsEveryAssistantReplyAndItsEndTokenOnly()
    {
        var turns = new[] { Human("Image-1: <image>\nImage-2: <image>\nWhat differs?"), Gpt("Colour."), Human("  And shape? "), Gpt("Same shape.\n") };
        var sample = Create(numImageToken: 4).Tokenize(turns, [2, 1]);

        var learned = sample.InputIds.Zip(sample.Labels).Where(p => p.Second != Ignore).Select(p => p.First).ToArray();
        Assert.All(sample.InputIds.Zip(sample.Labels).Where(p => p.Second != Ignore), p => Assert.Equal(p.First, p.Second));
        var expected = Tokenizer.Encode("Colour.<|im_end|>Same shape.<|im_end|>", addBos: false);   // values are stripped
        Assert.Equal(expected, learned);
        Assert.Equal(4 * 3, sample.InputIds.Count(id => id == Tokenizer.ImgContextId));
        Assert.Equal(Ignore, sample.Labels[0]);
        Assert.Equal(Tokenizer.ImEndId, sample.Labels[^1]);
        Assert.Equal(expected.Length, sample.SupervisedTokenCount);
    }

    [FixtureFact]
    public void TextOnlySamplesAndLeadingGptTurns()
    {
        var sample = Create().Tokenize([Gpt("ignored greeting"), Human("Hi"), Gpt("Hello!")], []);
        var text = Tokenizer.Decode(sample.InputIds, skipSpecialTokens: false);
        Assert.Equal("<s><|im_start|>system\n" + ConversationTemplate.InternLM2Chat.SystemMessage +
                     "<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello!<|im_end|>", text);
        Assert.Equal(Tokenizer.Encode("Hello!<|im_end|>", addBos: false),
            sample.Labels.Where(l => l != Ignore).ToArray());
    }

    [FixtureFact]
    public void SystemTurnReplacesTheSystemMessage()
    {
        var sample = Create().Tokenize([new(ConversationTurn.System, "Be brief."), Human("Hi"), Gpt("Yo")], []);
        Assert.StartsWith("<|im_start|>system\nBe brief.<|im_end|>", Tokenizer.Decode(sample.InputIds, skipSpecialTokens: false)[3..]);
    }

    [FixtureFact]
    public void SingleImageSampleGetsAPlaceholderWhenItHasNone()
    {
        var sample = Create(numImageToken: 2).Tokenize([Human("Describe."), Gpt("Grey.")], [1]);
        Assert.Contains("<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nDescribe.<|im_end|>",
            Tokenizer.Decode(sample.InputIds, skipSpecialTokens: false));
    }

    [FixtureFact]
    public void PlaceholderMismatchAndBadTurnsAreReportedTogether()
    {
        var e = Assert.Throws<VlmTuneException>(() => Create().Tokenize([Human("<image> <image>"), Gpt("x")], [1, 1, 1], "data.jsonl line 3"));
        Assert.Contains("data.jsonl line 3 has 2 '<image>' placeholder(s) but 3 image(s)", e.Message);

        var turns = Assert.Throws<VlmTuneException>(() => Create().Tokenize([Human("a"), Human("b"), Gpt("c"), Human("d")], [], "line 7"));
        Assert.Contains("line 7", turns.Message);
        Assert.Contains("turn 1 is from 'human'", turns.Message);
        Assert.Contains("ends with a 'human' turn", turns.Message);
    }

    [FixtureFact]
    public void TruncatesTextButNeverCutsImageTokens()
    {
        var turns = new[] { Human("<image>\nQ"), Gpt(string.Join(" ", Enumerable.Repeat("word", 50))) };
        var full = Create(numImageToken: 4).Tokenize(turns, [1]);
        var cut = Create(maxLength: full.InputIds.Length - 10, numImageToken: 4).Tokenize(turns, [1]);

        Assert.True(cut.Truncated);
        Assert.Equal(full.InputIds.Length, cut.FullLength);
        Assert.Equal(full.InputIds[..cut.InputIds.Length], cut.InputIds);
        Assert.Equal(full.Labels[..cut.Labels.Length], cut.Labels);   // the official code keeps the labels of what is left

        var imageEnd = Array.IndexOf(full.InputIds, Tokenizer.ImgEndId);
        var e = Assert.Throws<ImageTokensTruncatedException>(() => Create(maxLength: imageEnd, numImageToken: 4).Tokenize(turns, [1]));
        Assert.Equal(full.InputIds.Length, e.Length);
        Assert.Equal(imageEnd, e.MaxLength);
        Assert.Equal(imageEnd + 1, Create(maxLength: imageEnd + 1, numImageToken: 4).Tokenize(turns, [1]).InputIds.Length);
    }

    [FixtureFact]
    public void MasksEverythingOnATokenizationMismatchLikeTheOfficialCode()
    {
        // "</s>" in a reply is the pad id, which the official length check does not count: labels all masked.
        var sample = Create().Tokenize([Human("Hi"), Gpt("a</s>b")], []);
        Assert.True(sample.LabelsMaskedForMismatch);
        Assert.All(sample.Labels, l => Assert.Equal(Ignore, l));
        Assert.Equal(0, sample.SupervisedTokenCount);
    }

    [Fact]
    public void StripsLikePython()
    {
        Assert.Equal("a b", ConversationTokenizer.PythonStrip("\u001C\t a b \u3000\n\u001F"));
        Assert.Equal("", ConversationTokenizer.PythonStrip(" \n "));
    }
}
