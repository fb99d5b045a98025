using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using Microsoft.ML.Tokenizers;

namespace VlmTune.Text;

/// <summary>
/// Byte-level BPE (GPT-2 style) as HF's <c>Qwen2Tokenizer</c> / <c>Qwen2TokenizerFast</c> do it, for the Qwen2, Qwen2.5
/// and Qwen3 LLMs of InternVL2-1B, 2.5, 3 and 3.5:
/// <list type="number">
/// <item>the whole text is NFC-normalized (the slow tokenizer's <c>prepare_for_tokenization</c>), then split on the added
/// tokens, which become single ids;</item>
/// <item>each piece between them is cut by the pre-tokenizer regex (from <c>tokenizer.json</c>, or the tokenizer class's
/// own pattern for the <c>vocab.json</c> + <c>merges.txt</c> layout), each part's UTF-8 bytes are written with the GPT-2
/// byte↔unicode map and merged by rank;</item>
/// <item>no BOS (Qwen's <c>bos_token</c> is null), no EOS; pad is <c>&lt;|endoftext|&gt;</c>;</item>
/// <item>decoding maps the characters of each token back to bytes; bytes that are not UTF-8 become U+FFFD per maximal
/// subpart, as Python's <c>errors="replace"</c>.</item>
/// </list>
/// The merges are Microsoft.ML.Tokenizers' <see cref="BpeTokenizer"/> (byte-exact with HF on our corpus), fed one
/// pre-token at a time: its own regex pre-tokenizer runs .NET's regex over UTF-16, where <c>\p{L}</c> does not match a
/// letter outside the BMP (<c>'s𝔘</c> splits differently from HF), and its special-token split has no lstrip/rstrip.
/// </summary>
public sealed class ByteLevelBpeTokenizer : TextTokenizer
{
    /// <summary>Qwen2Tokenizer's <c>PRETOKENIZE_REGEX</c>, for folders without tokenizer.json (the same as Qwen's tokenizer.json holds).</summary>
    private const string QwenPattern =
        @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    /// <summary>GPT2Tokenizer's pattern (also the ByteLevel pre-tokenizer's with <c>use_regex: true</c>).</summary>
    private const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    /// <summary>Pre-tokens longer than this go through <see cref="LongWordMerges"/>: BpeTokenizer's merges slow down
    /// sharply on long words (a 100k-character CJK run took 12 s), HF's take O(n log n).</summary>
    internal int LongWordThreshold { get; set; } = 256;

    private readonly BpeTokenizer _bpe;
    private readonly LongWordMerges _longWords;
    private readonly Regex _preTokenizer;
    private readonly bool _nfc;
    private readonly string[] _tokens;                // id -> token (byte-level characters)
    private readonly Dictionary<string, int> _tokenIds;
    private readonly byte[][] _tokenBytes;            // id -> the bytes it stands for

    private ByteLevelBpeTokenizer(string modelDir, TokenizerFileConfig config, Dictionary<string, int> vocab,
        BpeTokenizer bpe, List<string> merges, Regex preTokenizer, bool nfc, PostProcessorTokens template) : base(modelDir, config)
    {
        _bpe = bpe;
        _longWords = new LongWordMerges(vocab, merges);
        _preTokenizer = preTokenizer;
        _nfc = nfc;
        _tokenIds = vocab;
        var size = vocab.Count == 0 ? 0 : vocab.Values.Max() + 1;
        _tokens = new string[size];
        _tokenBytes = new byte[size][];
        foreach (var (token, id) in vocab)
        {
            _tokens[id] = token;
            _tokenBytes[id] = ByteLevel.ToBytes(token);
        }
        for (var id = 0; id < size; id++)
            if (_tokens[id] is null && !config.AddedTokenList.Any(t => t.Id == id))
                throw new VlmTuneException($"The vocabulary of '{modelDir}' has no token with id {id} (ids must run from 0 without gaps).");
        _tokens = [.. _tokens.Select(t => t ?? "")];
        _tokenBytes = [.. _tokenBytes.Select(b => b ?? [])];

        // Qwen: no BOS unless the files name one; EOS from eos_token (<|im_end|> for chat models, <|endoftext|> for base).
        // A tokenizer.json whose post-processor adds a token first (Llama 3's <|begin_of_text|>) adds it by default.
        var bos = ResolveName(config.BosToken) ?? ResolveName(new SpecialTokenName(true, template.First));
        var eos = ResolveName(config.EosToken) ?? ResolveName(new SpecialTokenName(true, "<|endoftext|>"))
                  ?? throw new VlmTuneException($"The tokenizer in '{modelDir}' names no eos_token (tokenizer_config.json) and has no <|endoftext|>.");
        SetSpecialIds(bos, eos, ResolveName(config.UnkToken), config.AddBosToken ?? template.First is not null,
            config.AddEosToken ?? template.Last is not null);
    }

    internal static bool IsByteLevelClass(string? tokenizerClass) =>
        tokenizerClass is "Qwen2Tokenizer" or "Qwen2TokenizerFast" or "GPT2Tokenizer" or "GPT2TokenizerFast";

    /// <summary>
    /// Loads <c>tokenizer.json</c> (a BPE model with a byte-level pre-tokenizer), or else <c>vocab.json</c> +
    /// <c>merges.txt</c> with the pattern of <c>tokenizer_config.json</c>'s <c>tokenizer_class</c>, plus the added tokens
    /// of <c>tokenizer_config.json</c> and <c>added_tokens.json</c>.
    /// </summary>
    public static new ByteLevelBpeTokenizer Load(string modelDir)
    {
        var jsonPath = Path.Combine(modelDir, "tokenizer.json");
        return File.Exists(jsonPath) ? LoadTokenizerJson(modelDir, jsonPath) : LoadVocabAndMerges(modelDir);
    }

    private static ByteLevelBpeTokenizer LoadTokenizerJson(string modelDir, string path)
    {
        JsonDocument doc;
        try { doc = JsonDocument.Parse(File.ReadAllBytes(path)); }
        catch (JsonException e) { throw new VlmTuneException($"{path}: not valid JSON ({e.Message})."); }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("model", out var model) || model.ValueKind != JsonValueKind.Object)
                throw new VlmTuneException($"{path}: no \"model\" object; this is not a Hugging Face tokenizer.json.");
            var type = model.TryGetProperty("type", out var t) ? t.GetString() : null;
            if (type != "BPE")
                throw new VlmTuneException($"{path}: model.type is '{type}'; VlmTune reads BPE tokenizer.json files (byte-level BPE).");
            foreach (var flag in new[] { "dropout", "continuing_subword_prefix", "end_of_word_suffix" })
                if (model.TryGetProperty(flag, out var v) && v.ValueKind is not (JsonValueKind.Null or JsonValueKind.Undefined)
                    && !(v.ValueKind == JsonValueKind.String && v.GetString() == ""))
                    throw new VlmTuneException($"{path}: model.{flag} is {v.GetRawText()}; VlmTune supports byte-level BPE without it.");
            if (model.TryGetProperty("ignore_merges", out var ignore) && ignore.ValueKind == JsonValueKind.True)
                throw new VlmTuneException($"{path}: model.ignore_merges is true, which VlmTune does not implement.");

            var nfc = ReadNormalizer(root, path);
            var pattern = ReadPreTokenizerPattern(root, path);
            var vocab = ReadVocab(model.TryGetProperty("vocab", out var vv) ? vv : default, $"{path}: model.vocab");
            var merges = new List<string>();
            if (!model.TryGetProperty("merges", out var mm) || mm.ValueKind != JsonValueKind.Array)
                throw new VlmTuneException($"{path}: model.merges must be a list.");
            var index = 0;
            foreach (var merge in mm.EnumerateArray())
            {
                var pair = merge.ValueKind switch
                {
                    JsonValueKind.String => merge.GetString()!.Split(' ') is [var a, var b] ? (a, b) : default,
                    JsonValueKind.Array when merge.GetArrayLength() == 2 && merge[0].ValueKind == JsonValueKind.String
                                             && merge[1].ValueKind == JsonValueKind.String => (merge[0].GetString()!, merge[1].GetString()!),
                    _ => default((string, string)),
                };
                if (pair.Item1 is null)
                    throw new VlmTuneException($"{path}: model.merges[{index}] is {merge.GetRawText()}, not a pair of tokens.");
                merges.Add(pair.Item1 + " " + pair.Item2);
                index++;
            }

            var problems = new List<string>();
            var jsonAdded = new List<AddedTokenSpec>();
            if (root.TryGetProperty("added_tokens", out var addedTokens) && addedTokens.ValueKind == JsonValueKind.Array)
                foreach (var token in addedTokens.EnumerateArray())
                {
                    var where = $"{path}: added_tokens";
                    if (!token.TryGetProperty("id", out var idElement) || !idElement.TryGetInt32(out var id) || id < 0)
                        problems.Add($"{where}: entry {token.GetRawText()} needs a non-negative \"id\"");
                    else if (TokenizerFileConfig.ReadAddedToken(token, id, where, problems) is { } spec) jsonAdded.Add(spec);
                }
            if (problems.Count > 0) throw new VlmTuneException($"Invalid tokenizer files in '{modelDir}': " + string.Join("; ", problems) + ".");
            var config = TokenizerFileConfig.Read(modelDir, jsonAdded);
            return Create(modelDir, config, vocab, merges, pattern, nfc, path, ReadPostProcessor(root, path));
        }
    }

    private static ByteLevelBpeTokenizer LoadVocabAndMerges(string modelDir)
    {
        var vocabPath = Path.Combine(modelDir, "vocab.json");
        var mergesPath = Path.Combine(modelDir, "merges.txt");
        foreach (var file in new[] { vocabPath, mergesPath })
            if (!File.Exists(file))
                throw new VlmTuneException($"Tokenizer file '{file}' does not exist: a byte-level BPE folder needs tokenizer.json, or vocab.json and merges.txt.");
        var config = TokenizerFileConfig.Read(modelDir);
        // The slow tokenizer classes hard-code their pattern (and Qwen2Tokenizer its NFC); tokenizer.json carries both.
        var (pattern, nfc) = config.TokenizerClass switch
        {
            "Qwen2Tokenizer" or "Qwen2TokenizerFast" => (QwenPattern, true),
            "GPT2Tokenizer" or "GPT2TokenizerFast" => (Gpt2Pattern, false),
            var other => throw new VlmTuneException(
                $"{Path.Combine(modelDir, "tokenizer_config.json")}: tokenizer_class is '{other ?? "(none)"}'; beside vocab.json and merges.txt " +
                "VlmTune expects Qwen2Tokenizer (or GPT2Tokenizer), whose pre-tokenizer it knows."),
        };

        Dictionary<string, int> vocab;
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllBytes(vocabPath));
            vocab = ReadVocab(doc.RootElement, vocabPath);
        }
        catch (JsonException e) { throw new VlmTuneException($"{vocabPath}: not valid JSON ({e.Message})."); }

        var merges = new List<string>();
        var lineNumber = 0;
        foreach (var line in File.ReadLines(mergesPath))
        {
            lineNumber++;
            if (lineNumber == 1 && line.StartsWith("#version", StringComparison.Ordinal)) continue;
            if (line.Length == 0) continue;
            if (line.Split(' ').Length != 2)
                throw new VlmTuneException($"{mergesPath}: line {lineNumber} is '{line}', not two tokens separated by one space.");
            merges.Add(line);
        }
        return Create(modelDir, config, vocab, merges, pattern, nfc, mergesPath, default);
    }

    private static ByteLevelBpeTokenizer Create(string modelDir, TokenizerFileConfig config, Dictionary<string, int> vocab,
        List<string> merges, string pattern, bool nfc, string mergesSource, PostProcessorTokens template)
    {
        foreach (var ch in ByteLevel.ByteChars)
            if (!vocab.ContainsKey(ch.ToString()))
                throw new VlmTuneException($"The vocabulary of '{modelDir}' lacks the byte token '{ch}' (U+{(int)ch:X4}): it is not a byte-level BPE vocabulary.");
        for (var i = 0; i < merges.Count; i++)
        {
            var space = merges[i].IndexOf(' ');
            string left = merges[i][..space], right = merges[i][(space + 1)..];
            if (!vocab.ContainsKey(left) || !vocab.ContainsKey(right) || !vocab.ContainsKey(left + right))
                throw new VlmTuneException($"{mergesSource}: merge {i + 1} ('{merges[i]}') uses or makes a token that is not in the vocabulary.");
        }
        foreach (var token in config.AddedTokenList)
            if (vocab.TryGetValue(token.Content, out var id) && id != token.Id)
                throw new VlmTuneException($"Added token '{token.Content}' of '{modelDir}' has id {token.Id}, but the vocabulary gives it {id}: the tokenizer files do not belong together.");

        Regex regex;
        try { regex = new Regex(pattern, RegexOptions.Compiled | RegexOptions.CultureInvariant); }
        catch (ArgumentException e) { throw new VlmTuneException($"The pre-tokenizer pattern of '{modelDir}' is not a regex .NET can run ({e.Message})."); }

        BpeTokenizer bpe;
        try
        {
            bpe = BpeTokenizer.Create(new BpeOptions(vocab) { Merges = merges, ByteLevel = true });
        }
        catch (Exception e) when (e is not VlmTuneException)
        {
            throw new VlmTuneException($"Cannot build the BPE tokenizer of '{modelDir}': {e.Message}", e);
        }
        return new ByteLevelBpeTokenizer(modelDir, config, vocab, bpe, merges, regex, nfc, template);
    }

    private static Dictionary<string, int> ReadVocab(JsonElement vocab, string where)
    {
        if (vocab.ValueKind != JsonValueKind.Object) throw new VlmTuneException($"{where} must be an object of token -> id.");
        var result = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var entry in vocab.EnumerateObject())
        {
            if (entry.Value.ValueKind != JsonValueKind.Number || !entry.Value.TryGetInt32(out var id) || id < 0)
                throw new VlmTuneException($"{where}: \"{entry.Name}\" must map to a non-negative integer id.");
            if (!result.TryAdd(entry.Name, id)) throw new VlmTuneException($"{where}: \"{entry.Name}\" appears twice.");
        }
        if (result.Values.Distinct().Count() != result.Count) throw new VlmTuneException($"{where}: two tokens share an id.");
        return result;
    }

    /// <summary>The special tokens a TemplateProcessing post-processor puts before and after a single sequence.</summary>
    private readonly record struct PostProcessorTokens(string? First, string? Last);

    private static PostProcessorTokens ReadPostProcessor(JsonElement root, string path)
    {
        if (!root.TryGetProperty("post_processor", out var post) || post.ValueKind != JsonValueKind.Object) return default;
        var type = post.TryGetProperty("type", out var t) ? t.GetString() : null;
        if (type is "ByteLevel") return default;
        if (type != "TemplateProcessing" || !post.TryGetProperty("single", out var single) || single.ValueKind != JsonValueKind.Array)
            throw new VlmTuneException($"{path}: post_processor of type '{type}' is not implemented (ByteLevel or TemplateProcessing).");
        var steps = single.EnumerateArray().ToList();
        static string? Special(JsonElement step) =>
            step.TryGetProperty("SpecialToken", out var s) && s.TryGetProperty("id", out var id) ? id.GetString() : null;
        var sequence = steps.FindIndex(s => s.TryGetProperty("Sequence", out _));
        if (sequence < 0 || steps.Count - (sequence + 1) > 1 || sequence > 1 || steps.Where((_, i) => i != sequence).Any(s => Special(s) is null))
            throw new VlmTuneException($"{path}: post_processor.single {single.GetRawText()} is not one optional special token, the text, one optional special token.");
        return new PostProcessorTokens(sequence == 1 ? Special(steps[0]) : null, sequence < steps.Count - 1 ? Special(steps[^1]) : null);
    }

    /// <summary>Whether the normalizer is NFC (true) or absent (false); anything else is not implemented.</summary>
    private static bool ReadNormalizer(JsonElement root, string path)
    {
        if (!root.TryGetProperty("normalizer", out var n) || n.ValueKind == JsonValueKind.Null) return false;
        var type = n.TryGetProperty("type", out var t) ? t.GetString() : null;
        if (type == "NFC") return true;
        if (type == "Sequence" && n.TryGetProperty("normalizers", out var list) && list.ValueKind == JsonValueKind.Array)
        {
            if (list.GetArrayLength() == 0) return false;
            if (list.GetArrayLength() == 1 && list[0].TryGetProperty("type", out var inner) && inner.GetString() == "NFC") return true;
        }
        throw new VlmTuneException($"{path}: normalizer {n.GetRawText()} is not implemented; VlmTune's byte-level BPE supports NFC or none.");
    }

    /// <summary>The Split regex of the pre-tokenizer (Sequence[Split(Isolated), ByteLevel(use_regex=false)], or ByteLevel(use_regex=true)).</summary>
    private static string ReadPreTokenizerPattern(JsonElement root, string path)
    {
        if (!root.TryGetProperty("pre_tokenizer", out var pre) || pre.ValueKind != JsonValueKind.Object)
            throw new VlmTuneException($"{path}: pre_tokenizer is missing; a byte-level BPE tokenizer.json has a ByteLevel pre-tokenizer.");
        var steps = pre.TryGetProperty("type", out var t) && t.GetString() == "Sequence" && pre.TryGetProperty("pretokenizers", out var list)
            ? list.EnumerateArray().ToList()
            : [pre];
        string? pattern = null;
        var byteLevel = false;
        foreach (var step in steps)
        {
            var type = step.TryGetProperty("type", out var st) ? st.GetString() : null;
            if (type == "Split" && pattern is null && !byteLevel
                && step.TryGetProperty("pattern", out var p) && p.TryGetProperty("Regex", out var regex) && regex.ValueKind == JsonValueKind.String
                && step.TryGetProperty("behavior", out var behavior) && behavior.GetString() == "Isolated"
                && !(step.TryGetProperty("invert", out var invert) && invert.ValueKind == JsonValueKind.True))
                pattern = regex.GetString();
            else if (type == "ByteLevel" && !byteLevel
                     && !(step.TryGetProperty("add_prefix_space", out var aps) && aps.ValueKind == JsonValueKind.True))
            {
                byteLevel = true;
                if (!(step.TryGetProperty("use_regex", out var useRegex) && useRegex.ValueKind == JsonValueKind.False))
                {
                    if (pattern is not null) throw Unsupported(step);
                    pattern = Gpt2Pattern;
                }
            }
            else throw Unsupported(step);
        }
        if (!byteLevel || pattern is null)
            throw new VlmTuneException($"{path}: pre_tokenizer {pre.GetRawText()} is not byte-level BPE's (a Split regex then ByteLevel, or ByteLevel with use_regex).");
        return pattern;

        VlmTuneException Unsupported(JsonElement step) =>
            new($"{path}: pre_tokenizer step {step.GetRawText()} is not implemented (VlmTune reads an Isolated Split regex and ByteLevel without add_prefix_space).");
    }

    private protected override string ModelFileNames => "vocab.json/tokenizer.json";

    private protected override int ModelVocabSize => _tokens.Length;

    private protected override void EncodeText(string text, List<int> ids) =>
        base.EncodeText(_nfc ? UnicodeNfc.Normalize(text) : text, ids);

    private protected override void EncodeSegment(string text, List<int> ids)
    {
        var shadow = SupplementaryShadow(text);
        var end = 0;
        for (var match = _preTokenizer.Match(shadow); match.Success; match = match.NextMatch())
        {
            if (match.Length == 0) continue;
            if (match.Index > end) EncodeWord(text, end, match.Index, ids);   // text the regex skipped is a piece of its own
            EncodeWord(text, match.Index, match.Index + match.Length, ids);
            end = match.Index + match.Length;
        }
        if (end < text.Length) EncodeWord(text, end, text.Length, ids);
    }

    /// <summary>One pre-token; a cut the regex made inside a surrogate pair is undone by extending to whole code points.</summary>
    private void EncodeWord(string text, int start, int end, List<int> ids)
    {
        // Only the shadow's digits can be cut in half (\p{N} matches one UTF-16 unit): join the halves again.
        if (start > 0 && char.IsLowSurrogate(text[start]) && char.IsHighSurrogate(text[start - 1])) return;
        if (end < text.Length && char.IsLowSurrogate(text[end]) && char.IsHighSurrogate(text[end - 1])) end = NextCut(text, end);
        if (end - start > LongWordThreshold) { _longWords.Encode(text.AsSpan(start, end - start), ids); return; }
        foreach (var id in _bpe.EncodeToIds(text.AsSpan(start, end - start), considerPreTokenization: false, considerNormalization: false))
            ids.Add(id);
    }

    private int NextCut(string text, int inside)
    {
        // The rest of a split code point belongs to this piece; re-run the regex from the cut for the piece's true end.
        var match = _preTokenizer.Match(SupplementaryShadow(text), inside);
        return match.Success && match.Index == inside ? inside + match.Length : inside + 1;
    }

    /// <summary>
    /// .NET's regex sees UTF-16 units, so a letter or digit outside the BMP (𝔘, 𝟘, 𠀀) is two units of category Cs and
    /// not <c>\p{L}</c>/<c>\p{N}</c> as it is for HF's regex. The shadow has the same length, with each such pair replaced
    /// by two units of its class ("xx" for letters, "00" for digits); the regex runs on it and the cuts apply to the text.
    /// </summary>
    private static string SupplementaryShadow(string text)
    {
        var first = text.AsSpan().IndexOfAnyInRange('\uD800', '\uDBFF');
        if (first < 0) return text;
        var chars = text.ToCharArray();
        for (var i = first; i < chars.Length - 1; i++)
        {
            if (!char.IsHighSurrogate(chars[i]) || !char.IsLowSurrogate(chars[i + 1])) continue;
            var category = CharUnicodeInfoCategory(char.ConvertToUtf32(chars[i], chars[i + 1]));
            var stand = category switch
            {
                >= System.Globalization.UnicodeCategory.UppercaseLetter and <= System.Globalization.UnicodeCategory.OtherLetter => 'x',
                >= System.Globalization.UnicodeCategory.DecimalDigitNumber and <= System.Globalization.UnicodeCategory.OtherNumber => '0',
                _ => '\0',
            };
            if (stand != '\0') chars[i] = chars[i + 1] = stand;
            i++;
        }
        return new string(chars);
    }

    private static System.Globalization.UnicodeCategory CharUnicodeInfoCategory(int codePoint) =>
        System.Globalization.CharUnicodeInfo.GetUnicodeCategory(codePoint);

    private protected override bool TryModelTokenToId(string token, out int id) => _tokenIds.TryGetValue(token, out id);

    private protected override string? ModelIdToToken(int id) => (uint)id < (uint)_tokens.Length ? _tokens[id] : null;

    internal override ReadOnlySpan<byte> TokenBytes(int id)
    {
        if ((uint)id >= (uint)_tokenBytes.Length) throw OutOfVocabulary(id);
        return _tokenBytes[id];
    }

    internal override Utf8Replacement InvalidUtf8 => Utf8Replacement.MaximalSubpart;
}

/// <summary>
/// HF's BPE merge loop (<c>Word::merge_all</c>) over the bytes of one pre-token: a heap of adjacent pairs by (rank,
/// position), stale pairs skipped, so a word of n bytes takes O(n log n).
/// </summary>
internal sealed class LongWordMerges
{
    private readonly Dictionary<long, (int Rank, int Id)> _merges = [];
    private readonly int[] _byteIds = new int[256];

    public LongWordMerges(Dictionary<string, int> vocab, List<string> merges)
    {
        for (var b = 0; b < 256; b++) _byteIds[b] = vocab[ByteLevel.ByteChars[b].ToString()];
        for (var rank = 0; rank < merges.Count; rank++)
        {
            var space = merges[rank].IndexOf(' ');
            string left = merges[rank][..space], right = merges[rank][(space + 1)..];
            _merges[Key(vocab[left], vocab[right])] = (rank, vocab[left + right]);   // a repeated merge keeps its last rank, as HF
        }
    }

    private static long Key(int left, int right) => ((long)left << 32) | (uint)right;

    public void Encode(ReadOnlySpan<char> word, List<int> ids)
    {
        var bytes = Encoding.UTF8.GetBytes(word.ToArray());
        var n = bytes.Length;
        var symbols = new int[n];
        var next = new int[n];
        var prev = new int[n];
        var alive = new bool[n];
        for (var i = 0; i < n; i++) { symbols[i] = _byteIds[bytes[i]]; next[i] = i + 1 < n ? i + 1 : -1; prev[i] = i - 1; alive[i] = true; }
        var heap = new PriorityQueue<(int Left, int Right, int Id), (int Rank, int Left)>();
        void Push(int left, int right)
        {
            if (left >= 0 && right >= 0 && _merges.TryGetValue(Key(symbols[left], symbols[right]), out var m))
                heap.Enqueue((left, right, m.Id), (m.Rank, left));
        }
        for (var i = 0; i + 1 < n; i++) Push(i, i + 1);
        while (heap.TryDequeue(out var top, out _))
        {
            if (!alive[top.Left] || !alive[top.Right] || next[top.Left] != top.Right
                || !_merges.TryGetValue(Key(symbols[top.Left], symbols[top.Right]), out var m) || m.Id != top.Id) continue;
            symbols[top.Left] = top.Id;
            alive[top.Right] = false;
            next[top.Left] = next[top.Right];
            if (next[top.Right] >= 0) prev[next[top.Right]] = top.Left;
            Push(prev[top.Left], top.Left);
            Push(top.Left, next[top.Left]);
        }
        for (var i = 0; i >= 0 && i < n; i = next[i]) ids.Add(symbols[i]);
    }
}

/// <summary>GPT-2's byte↔unicode map: printable Latin-1 bytes are themselves, the other 68 bytes are U+0100 onwards.</summary>
internal static class ByteLevel
{
    /// <summary>The character of each byte value.</summary>
    public static readonly char[] ByteChars = BuildByteChars();

    private static readonly Dictionary<char, byte> CharBytes =
        ByteChars.Select((c, b) => (c, (byte)b)).ToDictionary(x => x.c, x => x.Item2);

    private static char[] BuildByteChars()
    {
        var chars = new char[256];
        var next = 256;
        for (var b = 0; b < 256; b++)
            chars[b] = b is >= '!' and <= '~' or >= '\u00A1' and <= '\u00AC' or >= '\u00AE' and <= '\u00FF' ? (char)b : (char)next++;
        return chars;
    }

    /// <summary>The bytes a vocabulary token stands for; a token with characters outside the map is its own UTF-8 (as HF's decoder).</summary>
    public static byte[] ToBytes(string token)
    {
        var bytes = new byte[token.Length];
        for (var i = 0; i < token.Length; i++)
        {
            if (!CharBytes.TryGetValue(token[i], out var b)) return Encoding.UTF8.GetBytes(token);
            bytes[i] = b;
        }
        return bytes;
    }
}
