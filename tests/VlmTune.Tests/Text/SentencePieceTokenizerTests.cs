using System.Text.Json;
using VlmTune.Tests.Support;
using VlmTune.Text;

namespace VlmTune.Tests.Text;

/// <summary>The InternLM2 tokenizer of the tiny InternVL2 fixture (sentencepiece without a dummy prefix).</summary>
public class SentencePieceTokenizerTests
{
    private static readonly Lazy<TextTokenizer> TokenizerLazy = new(() => TextTokenizer.Load(Fixtures.TinyModel));
    internal static TextTokenizer Tokenizer => TokenizerLazy.Value;

    public static TheoryData<int> GoldenTexts() => new(Enumerable.Range(0, 5));

    [FixtureTheory]
    [MemberData(nameof(GoldenTexts))]
    public void EncodesAndDecodesTheGoldenTextsExactly(int index)
    {
        var golden = Fixtures.Golden.GetProperty("tokenizer")[index];
        var text = golden.GetProperty("text").GetString()!;
        var ids = golden.GetProperty("ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();

        Assert.Equal(ids, Tokenizer.Encode(text));
        Assert.Equal(golden.GetProperty("decoded").GetString(), Tokenizer.Decode(ids));
    }

    [FixtureFact]
    public void SpecialTokensHaveTheReleasedIds()
    {
        var t = Tokenizer;
        Assert.Equal(92543, t.ImStartId);
        Assert.Equal(92542, t.ImEndId);
        Assert.Equal(92544, t.ImgStartId);
        Assert.Equal(92545, t.ImgEndId);
        Assert.Equal(92546, t.ImgContextId);
        Assert.Equal(92543, t.TokenToId("<|im_start|>"));
        Assert.Equal(92552, t.TokenToId("</box>"));
        Assert.Equal(1, t.BosId);
        Assert.Equal(2, t.EosId);
        Assert.Equal(2, t.PadId);
        Assert.Equal(92553, t.VocabSize);
        Assert.Equal(92544, Assert.IsType<SentencePieceTokenizer>(t).SentencePieceVocabSize);
        Assert.Equal("<|im_start|>", t.IdToToken(92543));
        Assert.Equal("▁world", t.IdToToken(2028));
        Assert.Equal(2028, t.TokenToId("▁world"));
        Assert.True(t.IsSpecial(92546));
        Assert.True(t.IsSpecial(1));
        Assert.False(t.IsSpecial(2028));
    }

    [FixtureFact]
    public void UnknownTokenIsAClearError()
    {
        var e = Assert.Throws<VlmTuneException>(() => Tokenizer.TokenToId("<not_a_token>"));
        Assert.Contains("<not_a_token>", e.Message);
        Assert.Throws<VlmTuneException>(() => Tokenizer.IdToToken(92553));
    }

    [FixtureFact]
    public void AddedTokensAreMatchedWholeAndSplitTheText()
    {
        // Without add_dummy_prefix, the text after a special token gets no leading "▁" (ass+istant, not ▁assistant).
        Assert.Equal([1, 92543, 525, 11353, 364], Tokenizer.Encode("<|im_start|>assistant\n"));
        Assert.Equal([92546, 92546, 92545], Tokenizer.Encode("<IMG_CONTEXT><IMG_CONTEXT></img>", addBos: false));
        // <s> written in text is the BOS id, as HF's added-token split does.
        Assert.Equal([15115, 1, 14748], Tokenizer.Encode("hello<s>world", addBos: false));
    }

    [FixtureFact]
    public void MatchesSentencepieceOnItsOwnEdgeCases()
    {
        // Expected ids from the sentencepiece library on this tokenizer.model (user-defined pieces stay whole,
        // the NUL piece, byte fallback for characters outside the vocabulary, whitespace-only text).
        Assert.Equal([92402, 274], Tokenizer.Encode("[UNUSED_TOKEN_5]x", addBos: false));
        Assert.Equal([92352, 92359, 24176], Tokenizer.Encode("ＥＬ hello", addBos: false));
        Assert.Equal([264, 354, 260], Tokenizer.Encode("a\0b", addBos: false));
        Assert.Equal([242, 175, 132], Tokenizer.Encode("ﬁ", addBos: false));
        Assert.Equal([393], Tokenizer.Encode("   ", addBos: false));
        Assert.Equal([450], Tokenizer.Encode("\r\n", addBos: false));
        Assert.Empty(Tokenizer.Encode("", addBos: false));
        Assert.Equal([1], Tokenizer.Encode(""));
    }

    [FixtureFact]
    public void DecodeReplacesEachInvalidByteLikeSentencepiece()
    {
        int B(int b) => Tokenizer.TokenToId($"<0x{b:X2}>");
        // sentencepiece: "\ufffd\ufffd world" (one U+FFFD per byte of the broken sequence)
        Assert.Equal("\uFFFD\uFFFD world", Tokenizer.Decode([B(0xE2), B(0x82), 2028]));
        Assert.Equal("\uFFFD\uFFFD\uFFFD", Tokenizer.Decode([B(0xED), B(0xA0), B(0x80)]));
        // the NUL piece is a NUL; user-defined pieces print as written; unk/BOS/EOS are special and skipped
        Assert.Equal("\0Ｅ[UNUSED_TOKEN_3]  ", Tokenizer.Decode([0, 1, 354, 92352, 92400, 2, 262, 262]));
    }

    [FixtureFact]
    public void DecodeKeepsSpecialTokensWhenAsked()
    {
        var ids = Tokenizer.Encode("<|im_start|>user\n<img><IMG_CONTEXT></img>hi<|im_end|>");
        Assert.Equal("<s><|im_start|>user\n<img><IMG_CONTEXT></img>hi<|im_end|>", Tokenizer.Decode(ids, skipSpecialTokens: false));
        Assert.Equal("user\nhi", Tokenizer.Decode(ids));
    }
}

public class SentencePieceTokenizerFilesTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vlmtune-tok-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private void CopyModel() => File.Copy(Path.Combine(Fixtures.TinyModel, "tokenizer.model"), Path.Combine(_dir, "tokenizer.model"));

    [Fact]
    public void MissingModelFileIsAClearError()
    {
        var e = Assert.Throws<VlmTuneException>(() => TextTokenizer.Load(_dir));
        Assert.Contains("tokenizer.model", e.Message);
    }

    [FixtureFact]
    public void FollowsAddBosTokenOfTheConfig()
    {
        CopyModel();
        File.WriteAllText(Path.Combine(_dir, "tokenizer_config.json"), """{"add_bos_token": false, "added_tokens_decoder": {"92544": {"content": "<img>", "special": true}}}""");
        var t = TextTokenizer.Load(_dir);
        Assert.Equal([92544, 9843], t.Encode("<img>Hello"));
        Assert.Equal("Hello", t.Decode([92544, 9843]));
        var missing = Assert.Throws<VlmTuneException>(() => t.ImEndId);
        Assert.Contains("<|im_end|>", missing.Message);
    }

    [FixtureFact]
    public void ReportsEveryInconsistentAddedTokenAtOnce()
    {
        CopyModel();
        File.WriteAllText(Path.Combine(_dir, "tokenizer_config.json"), """{"added_tokens_decoder": {"92544": {"content": "<img>"}, "x": {"content": "<a>"}}, "add_bos_token": "yes"}""");
        File.WriteAllText(Path.Combine(_dir, "added_tokens.json"), """{"<img>": 92545, "<b>": -3}""");
        var e = Assert.Throws<VlmTuneException>(() => TextTokenizer.Load(_dir));
        Assert.Contains("added_tokens_decoder.x", e.Message);
        Assert.Contains("add_bos_token", e.Message);
        Assert.Contains("'<img>' has id 92545", e.Message);
        Assert.Contains("\"<b>\"", e.Message);
    }
}
