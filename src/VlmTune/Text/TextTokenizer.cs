using System.Text;

namespace VlmTune.Text;

/// <summary>
/// The tokenizer of a checkpoint folder, behaving like the Hugging Face tokenizer InternVL loads from it
/// (<c>AutoTokenizer.from_pretrained(path, use_fast=False)</c>): added tokens are split out of the text first and become
/// single ids, the text between them goes through the model (sentencepiece or byte-level BPE), BOS/EOS follow
/// <c>add_bos_token</c>/<c>add_eos_token</c>. <see cref="Load"/> picks the implementation from the folder's files.
/// </summary>
public abstract class TextTokenizer
{
    private readonly Dictionary<string, int> _addedTokenIds;          // content -> id
    private readonly Dictionary<int, string> _addedTokenContents;     // id -> content
    private readonly HashSet<int> _specialIds = [];
    private readonly AddedTokenSplitter _splitter;
    private int _imStartId = -1, _imEndId = -1, _imgStartId = -1, _imgEndId = -1, _imgContextId = -1;

    private protected TextTokenizer(string modelDir, TokenizerFileConfig config)
    {
        ModelDir = modelDir;
        Config = config;
        _addedTokenIds = new Dictionary<string, int>(config.AddedTokens, StringComparer.Ordinal);
        _addedTokenContents = config.AddedTokenList.ToDictionary(t => t.Id, t => t.Content);
        _splitter = new AddedTokenSplitter(config.AddedTokenList);
    }

    private protected TokenizerFileConfig Config { get; }

    /// <summary>Folder the tokenizer was loaded from (for error messages).</summary>
    public string ModelDir { get; }

    /// <summary>Whether <see cref="Encode"/> prepends BOS by default (<c>add_bos_token</c>; never without a BOS token).</summary>
    public bool AddBosToken { get; private set; }

    /// <summary>Whether <see cref="Encode"/> appends EOS (<c>add_eos_token</c>).</summary>
    public bool AddEosToken { get; private set; }

    /// <summary>Id of the BOS token; null for tokenizers without one (Qwen: <c>bos_token: null</c>).</summary>
    public int? BosId { get; private set; }

    /// <summary>Id of the EOS token (<c>eos_token</c>: <c>&lt;/s&gt;</c> for InternLM2, <c>&lt;|im_end|&gt;</c> for Qwen chat models).</summary>
    public int EosId { get; private set; }

    /// <summary>Id of the unknown token; null for byte-level tokenizers, which have none.</summary>
    public int? UnknownId { get; private set; }

    /// <summary>Id of the pad token (<c>pad_token</c>; EOS when the files name none).</summary>
    public int PadId { get; private set; }

    /// <summary>Number of ids: model tokens plus added tokens.</summary>
    public int VocabSize { get; private set; }

    public int ImStartId => Required(_imStartId, SpecialTokens.ImStart);
    public int ImEndId => Required(_imEndId, SpecialTokens.ImEnd);
    public int ImgStartId => Required(_imgStartId, SpecialTokens.ImgStart);
    public int ImgEndId => Required(_imgEndId, SpecialTokens.ImgEnd);
    public int ImgContextId => Required(_imgContextId, SpecialTokens.ImgContext);

    /// <summary>The added tokens (content -> id) that are matched atomically in text.</summary>
    public IReadOnlyDictionary<string, int> AddedTokens => _addedTokenIds;

    /// <summary>
    /// Loads the tokenizer of a checkpoint folder: <c>tokenizer.model</c> is sentencepiece (InternLM2, Llama 2, Phi-3);
    /// <c>tokenizer.json</c> with a BPE model, or <c>vocab.json</c> + <c>merges.txt</c>, is byte-level BPE (Qwen2/2.5/3).
    /// <c>tokenizer_config.json</c>'s <c>tokenizer_class</c> decides when a folder holds both kinds.
    /// </summary>
    public static TextTokenizer Load(string modelDir)
    {
        ArgumentNullException.ThrowIfNull(modelDir);
        if (!Directory.Exists(modelDir))
            throw new VlmTuneException($"Tokenizer folder '{modelDir}' does not exist.");
        var hasSentencePiece = File.Exists(Path.Combine(modelDir, "tokenizer.model"));
        var hasTokenizerJson = File.Exists(Path.Combine(modelDir, "tokenizer.json"));
        var hasVocab = File.Exists(Path.Combine(modelDir, "vocab.json"));
        var tokenizerClass = ReadTokenizerClass(modelDir);

        if (ByteLevelBpeTokenizer.IsByteLevelClass(tokenizerClass) && (hasTokenizerJson || hasVocab))
            return ByteLevelBpeTokenizer.Load(modelDir);
        if (hasSentencePiece) return SentencePieceTokenizer.Load(modelDir);
        if (hasTokenizerJson || hasVocab) return ByteLevelBpeTokenizer.Load(modelDir);
        throw new VlmTuneException($"No tokenizer in '{modelDir}': expected tokenizer.model (sentencepiece), tokenizer.json, " +
                                   "or vocab.json + merges.txt (byte-level BPE) beside tokenizer_config.json.");
    }

    /// <summary>Token ids of <paramref name="text"/>; added tokens written in the text become their single ids.</summary>
    /// <param name="addBos">
    /// Add the tokenizer's own special tokens, as HF's <c>add_special_tokens=True</c>: BOS when <c>add_bos_token</c>,
    /// EOS when <c>add_eos_token</c>. False gives the bare ids of the text.
    /// </param>
    public int[] Encode(string text, bool addBos = true)
    {
        ArgumentNullException.ThrowIfNull(text);
        var ids = new List<int>(text.Length / 2 + 2);
        if (addBos && AddBosToken && BosId is { } bos) ids.Add(bos);
        EncodeText(text, ids);
        if (addBos && AddEosToken) ids.Add(EosId);
        return [.. ids];
    }

    /// <summary>Number of ids <see cref="Encode"/> gives for <paramref name="text"/>.</summary>
    public int CountTokens(string text, bool addBos = true) => Encode(text, addBos).Length;

    /// <summary>
    /// Text of <paramref name="ids"/>. With <paramref name="skipSpecialTokens"/> the special ids (BOS/EOS/UNK/pad and the
    /// special added tokens) are dropped, as HF's <c>decode(skip_special_tokens=True)</c>; otherwise added tokens are written
    /// as their text, with no spaces around them.
    /// </summary>
    public string Decode(IEnumerable<int> ids, bool skipSpecialTokens = true)
    {
        ArgumentNullException.ThrowIfNull(ids);
        var decoder = new TokenStreamDecoder(this, skipSpecialTokens);
        var text = new StringBuilder();
        foreach (var id in ids) text.Append(decoder.Push(id));
        text.Append(decoder.Flush());
        return text.ToString();
    }

    /// <summary>A decoder for generation: feed ids one at a time, get the text completed so far.</summary>
    public TokenStreamDecoder CreateStreamDecoder(bool skipSpecialTokens = true) => new(this, skipSpecialTokens);

    /// <summary>Id of an added token (<c>&lt;|im_end|&gt;</c>) or of a model token (<c>▁world</c>, <c>Ġworld</c>).</summary>
    /// <exception cref="VlmTuneException">The token is not in the vocabulary.</exception>
    public int TokenToId(string token)
    {
        if (TryTokenToId(token, out var id)) return id;
        throw new VlmTuneException($"Token '{token}' is not in the vocabulary of the tokenizer in '{ModelDir}' " +
                                   $"(neither an added token nor a token of {ModelFileNames}).");
    }

    public bool TryTokenToId(string token, out int id)
    {
        ArgumentNullException.ThrowIfNull(token);
        return _addedTokenIds.TryGetValue(token, out id) || TryModelTokenToId(token, out id);
    }

    /// <summary>The token text of <paramref name="id"/>: an added token's content, else the model's token.</summary>
    public string IdToToken(int id)
    {
        if (_addedTokenContents.TryGetValue(id, out var content)) return content;
        return ModelIdToToken(id) ?? throw OutOfVocabulary(id);
    }

    /// <summary>
    /// The most UTF-16 characters one token can stand for: its longest model token or added token. A token's text
    /// (a sentencepiece piece with ▁ for a space, a byte-level token with one character per byte) is never shorter
    /// than what it decodes to, so a text longer than this × the context can never fit.
    /// </summary>
    public int LongestTokenLength => _longest ??= ComputeLongestToken();
    private int? _longest;

    private int ComputeLongestToken()
    {
        int longest = 1;
        for (int id = 0; id < ModelVocabSize; id++) longest = Math.Max(longest, ModelIdToToken(id)?.Length ?? 0);
        foreach (var added in _addedTokenIds.Keys) longest = Math.Max(longest, added.Length);
        return longest;
    }

    /// <summary>Whether <paramref name="id"/> is a special token (dropped by <c>skip_special_tokens</c>).</summary>
    public bool IsSpecial(int id) => _specialIds.Contains(id);

    /// <summary>Whether <paramref name="id"/> stands for text: a model token or an added token (not a padded embedding row).</summary>
    public bool HasText(int id) => (uint)id < (uint)ModelVocabSize || IsAddedToken(id);

    /// <summary>Whether <paramref name="id"/> is an added token (written as its text, never as model bytes).</summary>
    public bool IsAddedToken(int id) => _addedTokenContents.ContainsKey(id);

    /// <summary>The model's files, for error messages ("tokenizer.model", "vocab.json").</summary>
    private protected abstract string ModelFileNames { get; }

    /// <summary>Number of tokens of the model itself, without added tokens.</summary>
    private protected abstract int ModelVocabSize { get; }

    /// <summary>The ids of <paramref name="text"/> without BOS/EOS. By default: split on added tokens, then the model.</summary>
    private protected virtual void EncodeText(string text, List<int> ids) => EncodeParts(_splitter.Split(text), ids);

    private protected void EncodeParts(List<(string Text, int Id)> parts, List<int> ids)
    {
        foreach (var (part, id) in parts)
            if (id >= 0) ids.Add(id);
            else EncodeSegment(part, ids);
    }

    private protected List<(string Text, int Id)> SplitOnAddedTokens(string text) => _splitter.Split(text);

    /// <summary>Appends the model's ids of a piece of text that holds no added token.</summary>
    private protected abstract void EncodeSegment(string text, List<int> ids);

    private protected abstract bool TryModelTokenToId(string token, out int id);

    /// <summary>The model's token of <paramref name="id"/>, null when out of range.</summary>
    private protected abstract string? ModelIdToToken(int id);

    /// <summary>The bytes a model id decodes to (empty for control tokens); added tokens are not model tokens.</summary>
    internal abstract ReadOnlySpan<byte> TokenBytes(int id);

    /// <summary>How undecodable bytes become U+FFFD (sentencepiece: one per byte; Python's <c>errors="replace"</c>: one per maximal subpart).</summary>
    internal abstract Utf8Replacement InvalidUtf8 { get; }

    /// <summary>Whether decoding drops the space of the first piece (sentencepiece's dummy prefix, Llama's <c>add_prefix_space</c>).</summary>
    internal virtual bool StripLeadingSpaceOnDecode => false;

    /// <summary>Sets the ids every family resolves differently; subclasses call it once their vocabulary is loaded.</summary>
    private protected void SetSpecialIds(int? bosId, int eosId, int? unknownId, bool addBos, bool addEos)
    {
        BosId = bosId;
        EosId = eosId;
        UnknownId = unknownId;
        AddBosToken = addBos && bosId is not null;
        AddEosToken = addEos;
        VocabSize = Math.Max(ModelVocabSize, _addedTokenContents.Count == 0 ? 0 : _addedTokenContents.Keys.Max() + 1);

        if (bosId is { } b) _specialIds.Add(b);
        _specialIds.Add(eosId);
        if (unknownId is { } u) _specialIds.Add(u);
        foreach (var content in Config.SpecialTokenContents)
            if (TryTokenToId(content, out var id)) _specialIds.Add(id);
        PadId = ResolveName(Config.PadToken) ?? eosId;

        _imStartId = TryTokenToId(SpecialTokens.ImStart, out var v) ? v : -1;
        _imEndId = TryTokenToId(SpecialTokens.ImEnd, out v) ? v : -1;
        _imgStartId = TryTokenToId(SpecialTokens.ImgStart, out v) ? v : -1;
        _imgEndId = TryTokenToId(SpecialTokens.ImgEnd, out v) ? v : -1;
        _imgContextId = TryTokenToId(SpecialTokens.ImgContext, out v) ? v : -1;
    }

    /// <summary>The id of a bos/eos/unk/pad name of the files; null when not given, null, or not in the vocabulary.</summary>
    private protected int? ResolveName(SpecialTokenName name) =>
        name.Content is { } content && TryTokenToId(content, out var id) ? id : null;

    private protected VlmTuneException OutOfVocabulary(int id) =>
        new($"Token id {id} is outside the vocabulary (0..{VocabSize - 1}) of the tokenizer in '{ModelDir}'.");

    private int Required(int id, string token) => id >= 0
        ? id
        : throw new VlmTuneException($"The tokenizer in '{ModelDir}' has no '{token}' token; InternVL needs it " +
                                     "(it is an added token of tokenizer_config.json / added_tokens.json).");

    private static string? ReadTokenizerClass(string modelDir)
    {
        var problems = new List<string>();
        var path = Path.Combine(modelDir, "tokenizer_config.json");
        if (TokenizerFileConfig.ReadJson(path, problems) is { ValueKind: System.Text.Json.JsonValueKind.Object } config &&
            config.TryGetProperty("tokenizer_class", out var cls) && cls.ValueKind == System.Text.Json.JsonValueKind.String)
            return cls.GetString();
        if (problems.Count > 0) throw new VlmTuneException(problems[0]);
        return null;
    }
}

/// <summary>How a decoder turns bytes that are not UTF-8 into U+FFFD.</summary>
internal enum Utf8Replacement
{
    /// <summary>Every byte that does not start a well-formed sequence is one U+FFFD (sentencepiece).</summary>
    PerByte,

    /// <summary>Each maximal subpart of an ill-formed sequence is one U+FFFD (Python's and Rust's UTF-8 decoders).</summary>
    MaximalSubpart,
}
