using VlmTune.Tests.Support;
using VlmTune.Text;

namespace VlmTune.Tests.Text;

public class TokenStreamDecoderTests
{
    private static TextTokenizer Tokenizer => SentencePieceTokenizerTests.Tokenizer;

    [FixtureTheory]
    [InlineData("emoji 😀 and family 👨‍👩‍👧‍👦 ok")]
    [InlineData("½ ¼ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﬁ")]
    [InlineData("请你根据这张图片,讲一个脑洞大开的梗。『住手!")]
    [InlineData("<|im_start|>assistant\n🇨🇳 text<|im_end|>")]
    public void StreamedPiecesAddUpToTheFullDecode(string text)
    {
        var ids = Tokenizer.Encode(text);
        foreach (var skip in new[] { true, false })
        {
            var decoder = Tokenizer.CreateStreamDecoder(skip);
            var pieces = ids.Select(decoder.Push).ToList();
            pieces.Add(decoder.Flush());
            Assert.Equal(Tokenizer.Decode(ids, skip), string.Concat(pieces));
            Assert.Equal(Tokenizer.Decode(ids, skip), decoder.Text);
            Assert.All(pieces, p => Assert.False(p.Length > 0 && char.IsHighSurrogate(p[^1]), $"split surrogate pair in '{p}'"));
            Assert.DoesNotContain(pieces, p => p.Contains('\uFFFD'));
        }
    }

    /// <summary>Checkpoints pad their vocabulary (Qwen3: 151,936 rows, 151,678 ids); a padded id decodes to nothing.</summary>
    [FixtureFact]
    public void IdsOfPaddedEmbeddingRowsDecodeToNothing()
    {
        int padded = Tokenizer.VocabSize + 40;
        Assert.False(Tokenizer.HasText(padded));
        var ids = Tokenizer.Encode("hello", addBos: false);
        Assert.Equal("hello", Tokenizer.Decode([.. ids, padded, padded]));
        var decoder = Tokenizer.CreateStreamDecoder();
        Assert.Equal("", decoder.Push(padded));
    }

    [FixtureFact]
    public void HoldsBackACharacterUntilItsLastBytePiece()
    {
        var ids = Tokenizer.Encode("😀", addBos: false);   // <0xF0><0x9F><0x98><0x80>
        Assert.Equal(4, ids.Length);
        var decoder = Tokenizer.CreateStreamDecoder();
        Assert.Equal(["", "", "", "😀"], ids.Select(decoder.Push).ToArray());
        Assert.Equal("", decoder.Flush());
    }

    [FixtureFact]
    public void FlushTurnsAnUnfinishedCharacterIntoReplacementCharacters()
    {
        var decoder = Tokenizer.CreateStreamDecoder();
        Assert.Equal("", decoder.Push(Tokenizer.TokenToId("<0xE2>")));
        Assert.Equal("", decoder.Push(Tokenizer.TokenToId("<0x82>")));
        Assert.Equal("\uFFFD\uFFFD", decoder.Flush());
        // a broken sequence followed by a normal piece is replaced at once, byte by byte, like sentencepiece
        var again = Tokenizer.CreateStreamDecoder();
        again.Push(Tokenizer.TokenToId("<0xE2>"));
        Assert.Equal("\uFFFD world", again.Push(Tokenizer.TokenToId("▁world")));
    }

    [FixtureFact]
    public void SkipsSpecialTokensInTheMiddleOfACharacter()
    {
        var bytes = Tokenizer.Encode("😀", addBos: false);
        int[] ids = [bytes[0], bytes[1], Tokenizer.ImEndId, bytes[2], bytes[3]];
        var decoder = Tokenizer.CreateStreamDecoder();
        Assert.Equal("😀", string.Concat(ids.Select(decoder.Push)) + decoder.Flush());
        Assert.Equal("😀", Tokenizer.Decode(ids));
    }
}
