using System.Text;
using VlmTune.Text;

namespace VlmTune.Tests.Text;

public class UnicodeNfcTests
{
    [Fact]
    public void EqualsIcuNfcOnEveryCodePointAndOnCombiningSequences()
    {
        // The test host loads ICU (no InvariantGlobalization), so string.Normalize is the reference here.
        var failures = new List<string>();
        for (var cp = 0; cp < 0x110000; cp++)
        {
            if (cp is >= 0xD800 and <= 0xDFFF || !Rune.IsValid(cp)) continue;
            var s = char.ConvertFromUtf32(cp);
            string expected;
            try { expected = s.Normalize(NormalizationForm.FormC); }
            catch (ArgumentException) { continue; }   // ICU refuses unassigned code points; they normalize to themselves
            if (UnicodeNfc.Normalize(s) != expected) failures.Add($"U+{cp:X4}");
        }
        foreach (var s in new[] { "e\u0301", "q\u0307\u0323", "\u1100\u1161\u11A8", "\uAC00\u11A8", "A\u030A\u0301", "\u0041\u0300\u0316",
                     "o\u0302\u0301x\u0323\u0302", "\u0344\u0301", ">\u0338", "\u00C5\u212B\u2126", "a\u0308\u0301b\u0301\u0308", "\u0958\u0301" })
            if (UnicodeNfc.Normalize(s) != s.Normalize(NormalizationForm.FormC)) failures.Add(string.Join(" ", s.Select(c => $"{(int)c:X4}")));
        // Unicode versions differ a little (our tables: Python's unicodedata; .NET: its ICU); a handful of new characters may.
        Assert.True(failures.Count <= 40, $"{failures.Count} differ: " + string.Join(", ", failures.Take(20)));
        Assert.Equal("\u00E9", UnicodeNfc.Normalize("e\u0301"));
        Assert.Equal("\uAC01", UnicodeNfc.Normalize("\u1100\u1161\u11A8"));
        Assert.Equal("a\uD800b", UnicodeNfc.Normalize("a\uD800b"));   // a lone surrogate stays, as in Python
    }
}

public class AddedTokenSplitterTests
{
    private static List<(string, int)> Split(string text, params AddedTokenSpec[] tokens) => new AddedTokenSplitter(tokens).Split(text);

    [Fact]
    public void FindsTheLongestTokenAtTheEarliestPosition()
    {
        Assert.Equal([("x", -1), ("<a>", 1), ("<a>", 1), ("b", -1)], Split("x<a><a>b", new AddedTokenSpec("<a>", 1, true)));
        Assert.Equal([("<ab>", 2), ("c", -1)], Split("<ab>c", new AddedTokenSpec("<a", 1, true), new AddedTokenSpec("<ab>", 2, true)));
    }

    [Fact]
    public void StripsWhiteSpaceBesideLStripAndRStripTokensAsPython()
    {
        var rstrip = new AddedTokenSpec("<|user|>", 7, true, RStrip: true);
        Assert.Equal([("<|user|>", 7), ("Hi", -1)], Split("<|user|>\n \u001FHi", rstrip));   // Python's isspace includes U+001F
        var lstrip = new AddedTokenSpec("<m>", 3, true, LStrip: true);
        Assert.Equal([("a", -1), ("<m>", 3), (" b", -1)], Split("a \t<m> b", lstrip));
        Assert.Equal([("<m>", 3)], Split("  <m>", lstrip));                                    // stripped to nothing: no part
    }

    [Fact]
    public void SingleWordTokensTouchingAWordStayText()
    {
        var word = new AddedTokenSpec("<w>", 5, true, SingleWord: true);
        Assert.Equal([("a<w>", -1), (" b", -1)], Split("a<w> b", word));
        Assert.Equal([("a ", -1), ("<w>b", -1)], Split("a <w>b", word));
        Assert.Equal([("a ", -1), ("<w>", 5), (" b", -1)], Split("a <w> b", word));
    }
}
