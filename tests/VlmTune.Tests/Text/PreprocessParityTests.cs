using System.Text.Json;
using VlmTune.Tests.Support;
using VlmTune.Text;

namespace VlmTune.Tests.Text;

/// <summary>
/// Input ids and labels of every template against the official preprocess functions run verbatim
/// (TestData/preprocess_parity.json, its "source" says how): exact, quirks included.
/// </summary>
public class PreprocessParityTests(TokenizerVariants variants) : IClassFixture<TokenizerVariants>
{
    private static readonly Lazy<JsonElement> Cases = new(() => JsonDocument.Parse(File.ReadAllText(
        Path.Combine(Fixtures.RepoRoot, "tests", "VlmTune.Tests", "Text", "TestData", "preprocess_parity.json"))).RootElement.GetProperty("cases"));

    public static TheoryData<int> CaseIndexes() => new(Enumerable.Range(0, 20));

    [Fact]
    public void EveryCaseIsRun() => Assert.Equal(CaseIndexes().Count, Cases.Value.GetArrayLength());

    [FixtureTheory]
    [MemberData(nameof(CaseIndexes))]
    public void MatchesTheOfficialPreprocessFunctionExactly(int index)
    {
        var c = Cases.Value[index];
        var template = ConversationTemplate.Get(c.GetProperty("template").GetString()!);
        var turns = c.GetProperty("conversations").EnumerateArray()
            .Select(t => new ConversationTurn(t.GetProperty("from").GetString()!, t.GetProperty("value").GetString()!)).ToArray();
        var tiles = c.GetProperty("image_tiles").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        var numImageToken = c.GetProperty("num_image_token").GetInt32();
        var maxLength = c.GetProperty("max_length").GetInt32();
        var expectedIds = c.GetProperty("input_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        var expectedLabels = c.GetProperty("labels").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        var kind = c.GetProperty("tokenizer").GetString();

        if (kind == "phi3-quirk")
        {
            // No tokenizer here has Phi-3's leading "▁"; the label arithmetic runs on an encoder that adds it.
            var tokenizer = variants.Phi3Tokens;
            int[] Encode(string text) => [tokenizer.BosId!.Value, .. tokenizer.AddedTokens.Keys.Any(t => text.StartsWith(t, StringComparison.Ordinal))
                ? [tokenizer.TokenToId("▁")] : Array.Empty<int>(), .. tokenizer.Encode(text, addBos: false)];
            var text = new ConversationTokenizer(tokenizer, template, numImageToken, maxLength).Render(turns, tiles);
            var ids = Encode(text);
            var labels = (int[])ids.Clone();
            var learnedEnd = TrainingLabels.MaskPhi3(text, labels, template, Encode, tokenizer.TokenToId("<|endoftext|>"));
            Assert.Equal(expectedIds, ids);
            Assert.Equal(ids.Length, learnedEnd);   // the official length check passes
            Assert.Equal(expectedLabels, labels);
            return;
        }

        var conversations = new ConversationTokenizer(kind switch
        {
            "bos" => SentencePieceTokenizerTests.Tokenizer,
            "no-bos" => variants.NoBos,
            "phi3-tokens" => variants.Phi3Tokens,
            _ => throw new ArgumentException(kind),
        }, template, numImageToken, maxLength);
        var sample = conversations.Tokenize(turns, tiles);
        Assert.Equal(expectedIds, sample.InputIds);
        Assert.Equal(expectedLabels, sample.Labels);
        Assert.Equal(expectedLabels.All(l => l == ConversationTokenizer.IgnoreTokenId) && template.Labels != TrainingLabelStyle.InternVL25,
            sample.LabelsMaskedForMismatch);
    }
}
