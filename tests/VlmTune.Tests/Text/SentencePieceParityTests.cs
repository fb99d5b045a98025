using System.Text.Json;
using VlmTune.Tests.Support;
using VlmTune.Text;

namespace VlmTune.Tests.Text;

/// <summary>
/// Ids and decoded text of the sentencepiece library (with the official tokenizer's added-token split) on texts chosen to
/// stress BPE: equal-score merges ("sss", "!!!"), user-defined pieces, byte fallback, whitespace runs, added tokens.
/// </summary>
public class SentencePieceParityTests
{
    private static TextTokenizer Tokenizer => SentencePieceTokenizerTests.Tokenizer;

    private static readonly Lazy<JsonElement> Data = new(() => JsonDocument.Parse(File.ReadAllText(
        Path.Combine(Fixtures.RepoRoot, "tests", "VlmTune.Tests", "Text", "TestData", "sentencepiece_parity.json"))).RootElement);

    private static int[] Ids(JsonElement e) => e.GetProperty("ids").EnumerateArray().Select(x => x.GetInt32()).ToArray();

    [FixtureFact]
    public void EncodesLikeSentencepiece()
    {
        var failures = new List<string>();
        foreach (var c in Data.Value.GetProperty("encode").EnumerateArray())
        {
            var text = c.GetProperty("text").GetString()!;
            var expected = Ids(c);
            var actual = Tokenizer.Encode(text);
            if (!actual.SequenceEqual(expected))
                failures.Add($"{JsonSerializer.Serialize(text)}: expected [{string.Join(",", expected)}], got [{string.Join(",", actual)}]");
            if (Tokenizer.Decode(expected) != c.GetProperty("decoded").GetString())
                failures.Add($"{JsonSerializer.Serialize(text)}: decoded {JsonSerializer.Serialize(Tokenizer.Decode(expected))}");
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures.Take(20)));
        Assert.True(Data.Value.GetProperty("encode").GetArrayLength() > 300);
    }

    [FixtureFact]
    public void DecodesArbitraryIdSequencesLikeSentencepiece()
    {
        var failures = new List<string>();
        foreach (var c in Data.Value.GetProperty("decode").EnumerateArray())
        {
            var ids = Ids(c);
            var expected = c.GetProperty("decoded").GetString();
            var full = Tokenizer.Decode(ids);
            var stream = Tokenizer.CreateStreamDecoder();
            var streamed = string.Concat(ids.Select(stream.Push)) + stream.Flush();
            if (full != expected || streamed != expected)
                failures.Add($"[{string.Join(",", ids)}]: expected {JsonSerializer.Serialize(expected)}, decoded {JsonSerializer.Serialize(full)}, streamed {JsonSerializer.Serialize(streamed)}");
        }
        Assert.True(failures.Count == 0, string.Join("\n", failures.Take(20)));
    }

    [FixtureFact]
    public void BreaksEqualScoreMergesLeftmostFirst()
    {
        var ss = Tokenizer.TokenToId("ss");
        var s = Tokenizer.TokenToId("s");
        Assert.Equal([ss, s], Tokenizer.Encode("sss", addBos: false));
    }
}
