using System.Globalization;
using System.Text;

namespace VlmTune.Text;

/// <summary>
/// Unicode NFC (canonical decomposition, canonical ordering, canonical composition) from our own tables
/// (<c>UnicodeNfcData.cs</c>), because <see cref="string.Normalize()"/> is a silent no-op in hosts built with
/// <c>InvariantGlobalization</c> (the vlmtune CLI): Qwen's tokenizers NFC-normalize every text.
/// </summary>
internal static partial class UnicodeNfc
{
    private const int SBase = 0xAC00, LBase = 0x1100, VBase = 0x1161, TBase = 0x11A7;
    private const int LCount = 19, VCount = 21, TCount = 28, NCount = VCount * TCount, SCount = LCount * NCount;

    private static readonly Lazy<Tables> Data = new(Tables.Parse);

    /// <summary>The NFC form of <paramref name="text"/>; the same instance when it is already NFC-stable by a quick check.</summary>
    public static string Normalize(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        // Below U+0300 every character is its own NFC and nothing composes with it from the right.
        if (text.AsSpan().IndexOfAnyExceptInRange('\0', '\u02FF') < 0) return text;
        var tables = Data.Value;

        var decomposed = new List<int>(text.Length + 8);
        for (var i = 0; i < text.Length; i++)
        {
            // A lone surrogate stays itself, as in Python (Rune would make it U+FFFD).
            var cp = char.IsHighSurrogate(text[i]) && i + 1 < text.Length && char.IsLowSurrogate(text[i + 1])
                ? char.ConvertToUtf32(text[i], text[++i])
                : text[i];
            Decompose(cp, decomposed, tables);
        }

        // Canonical ordering: a stable sort of each run of non-starters by combining class.
        for (var i = 1; i < decomposed.Count; i++)
        {
            var cc = tables.Ccc(decomposed[i]);
            if (cc == 0) continue;
            for (var j = i; j > 0 && tables.Ccc(decomposed[j - 1]) > cc; j--)
                (decomposed[j - 1], decomposed[j]) = (decomposed[j], decomposed[j - 1]);
        }

        // Canonical composition (the algorithm of UAX #15).
        if (decomposed.Count > 0)
        {
            var starterPos = 0;
            var starter = decomposed[0];
            var lastClass = tables.Ccc(starter) == 0 ? 0 : 256;
            var write = 1;
            for (var read = 1; read < decomposed.Count; read++)
            {
                var ch = decomposed[read];
                var cc = tables.Ccc(ch);
                if ((lastClass < cc || lastClass == 0) && Compose(starter, ch, tables) is { } composite)
                {
                    decomposed[starterPos] = starter = composite;
                    continue;
                }
                if (cc == 0) { starterPos = write; starter = ch; }
                lastClass = cc;
                decomposed[write++] = ch;
            }
            decomposed.RemoveRange(write, decomposed.Count - write);
        }

        var result = new StringBuilder(decomposed.Count + 4);
        foreach (var cp in decomposed)
            if (cp is >= 0xD800 and <= 0xDFFF) result.Append((char)cp);
            else result.Append(new Rune(cp).ToString());
        var normalized = result.ToString();
        return normalized == text ? text : normalized;
    }

    private static void Decompose(int cp, List<int> output, Tables tables)
    {
        if (cp is >= SBase and < SBase + SCount)
        {
            var index = cp - SBase;
            output.Add(LBase + index / NCount);
            output.Add(VBase + index % NCount / TCount);
            if (index % TCount != 0) output.Add(TBase + index % TCount);
            return;
        }
        if (tables.Decompositions.TryGetValue(cp, out var parts))
        {
            foreach (var part in parts) Decompose(part, output, tables);
            return;
        }
        output.Add(cp);
    }

    private static int? Compose(int first, int second, Tables tables)
    {
        if (first is >= LBase and < LBase + LCount && second is >= VBase and < VBase + VCount)
            return SBase + ((first - LBase) * VCount + second - VBase) * TCount;
        if (first is >= SBase and < SBase + SCount && (first - SBase) % TCount == 0 && second is > TBase and < TBase + TCount)
            return first + second - TBase;
        return tables.Compositions.TryGetValue(((long)first << 21) | (uint)second, out var composite) ? composite : null;
    }

    private sealed class Tables
    {
        public readonly Dictionary<int, int[]> Decompositions = [];
        public readonly Dictionary<long, int> Compositions = [];
        private readonly Dictionary<int, byte> _combiningClasses = [];

        public int Ccc(int cp) => cp < 0x300 ? 0 : _combiningClasses.GetValueOrDefault(cp);

        public static Tables Parse()
        {
            var tables = new Tables();
            foreach (var entry in Entries(DecompositionData))
            {
                var (cp, parts) = Split(entry);
                tables.Decompositions[Hex(cp)] = [.. parts.Split(',').Select(Hex)];
            }
            foreach (var entry in Entries(CombiningClassData))
            {
                var (range, value) = Split(entry);
                var dash = range.IndexOf('-');
                for (var cp = Hex(range[..dash]); cp <= Hex(range[(dash + 1)..]); cp++)
                    tables._combiningClasses[cp] = (byte)Hex(value);
            }
            foreach (var entry in Entries(CompositionData))
            {
                var (pair, composite) = Split(entry);
                var comma = pair.IndexOf(',');
                tables.Compositions[((long)Hex(pair[..comma]) << 21) | (uint)Hex(pair[(comma + 1)..])] = Hex(composite);
            }
            return tables;
        }

        private static IEnumerable<string> Entries(string data) => data.Split(';', StringSplitOptions.RemoveEmptyEntries);

        private static (string Key, string Value) Split(string entry)
        {
            var colon = entry.IndexOf(':');
            return (entry[..colon], entry[(colon + 1)..]);
        }

        private static int Hex(string s) => int.Parse(s, NumberStyles.HexNumber, CultureInfo.InvariantCulture);
    }
}
