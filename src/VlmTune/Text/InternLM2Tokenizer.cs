using System.Text;
using System.Text.RegularExpressions;
using Microsoft.ML.Tokenizers;

namespace VlmTune.Text;

/// <summary>
/// The InternLM2 tokenizer of InternVL2 checkpoints, behaving like the official slow <c>InternLM2Tokenizer</c>
/// (HF <c>PreTrainedTokenizer</c> over sentencepiece):
/// <list type="bullet">
/// <item>text is first split on the added tokens (<c>&lt;|im_start|&gt;</c>, <c>&lt;img&gt;</c>, <c>&lt;s&gt;</c>, ...), which
/// become single ids; every piece of text between them is encoded by sentencepiece on its own. InternLM2's model has
/// <c>add_dummy_prefix = false</c>, so no piece gets a leading "▁" (<c>"assistant"</c> after <c>&lt;|im_start|&gt;</c> is
/// <c>ass</c>+<c>istant</c>).</item>
/// <item>BOS is prepended when <c>add_bos_token</c> (default true), EOS appended only when <c>add_eos_token</c> (default false).</item>
/// <item>decoding drops special ids (when asked) and turns the remaining pieces into bytes: "▁" is a space, byte-fallback
/// pieces <c>&lt;0xE2&gt;</c> are raw bytes, and invalid UTF-8 becomes one U+FFFD per byte, as sentencepiece does.</item>
/// </list>
/// Microsoft.ML.Tokenizers' <see cref="SentencePieceTokenizer"/> loads the model (BOS/EOS/UNK ids, byte fallback) and
/// normalizes; the merges are our <see cref="SentencePieceBpe"/>, because its BPE breaks score ties differently from
/// sentencepiece (see there).
/// </summary>
public sealed partial class InternLM2Tokenizer
{
    /// <summary>What sentencepiece prints for the unknown piece (its default <c>unk_surface</c>).</summary>
    private const string UnknownSurface = " \u2047 ";

    private readonly SentencePieceTokenizer _sentencePiece;
    private readonly SentencePieceBpe _bpe;
    private readonly Dictionary<string, int> _addedTokenIds;          // content -> id
    private readonly Dictionary<int, string> _addedTokenContents;     // id -> content
    private readonly HashSet<int> _specialIds;
    private readonly string[] _pieces;                                // sentencepiece id -> piece
    private readonly Dictionary<string, int> _pieceIds;               // piece -> sentencepiece id
    private readonly byte[][] _pieceBytes;                            // sentencepiece id -> bytes it decodes to
    private readonly AddedTokenSplitter _splitter;
    private readonly bool _stripLeadingSpaceOnDecode;

    private readonly int _imStartId, _imEndId, _imgStartId, _imgEndId, _imgContextId;

    public const string ImStartToken = "<|im_start|>";
    public const string ImEndToken = "<|im_end|>";
    public const string ImgStartToken = "<img>";
    public const string ImgEndToken = "</img>";
    public const string ImgContextToken = "<IMG_CONTEXT>";

    /// <summary>Folder the tokenizer was loaded from (for error messages).</summary>
    public string ModelDir { get; }

    /// <summary>Whether <see cref="Encode"/> prepends BOS by default (<c>add_bos_token</c>).</summary>
    public bool AddBosToken { get; }

    /// <summary>Whether <see cref="Encode"/> appends EOS (<c>add_eos_token</c>; false for InternLM2).</summary>
    public bool AddEosToken { get; }

    public int BosId { get; }
    public int EosId { get; }
    public int UnknownId { get; }

    /// <summary>Id of the pad token (<c>pad_token</c>, which is <c>&lt;/s&gt;</c> = EOS for InternLM2).</summary>
    public int PadId { get; }

    /// <summary>Number of ids: sentencepiece pieces plus added tokens (92553 for InternVL2).</summary>
    public int VocabSize { get; }

    /// <summary>Number of pieces in <c>tokenizer.model</c> (92544 for InternLM2; HF's <c>vocab_size</c>).</summary>
    public int SentencePieceVocabSize => _pieces.Length;

    public int ImStartId => Required(_imStartId, ImStartToken);
    public int ImEndId => Required(_imEndId, ImEndToken);
    public int ImgStartId => Required(_imgStartId, ImgStartToken);
    public int ImgEndId => Required(_imgEndId, ImgEndToken);
    public int ImgContextId => Required(_imgContextId, ImgContextToken);

    /// <summary>The added tokens (content -> id) that are matched atomically in text.</summary>
    public IReadOnlyDictionary<string, int> AddedTokens => _addedTokenIds;

    private InternLM2Tokenizer(string modelDir, SentencePieceTokenizer sentencePiece, SentencePieceModelFile model,
        TokenizerFileConfig config)
    {
        ModelDir = modelDir;
        _sentencePiece = sentencePiece;
        AddBosToken = config.AddBosToken;
        AddEosToken = config.AddEosToken;
        BosId = sentencePiece.BeginningOfSentenceId;
        EosId = sentencePiece.EndOfSentenceId;
        UnknownId = sentencePiece.UnknownId;
        _stripLeadingSpaceOnDecode = sentencePiece.AddDummyPrefix;

        _pieces = new string[model.Pieces.Count];
        _pieceBytes = new byte[model.Pieces.Count][];
        _pieceIds = new Dictionary<string, int>(model.Pieces.Count, StringComparer.Ordinal);
        for (var id = 0; id < model.Pieces.Count; id++)
        {
            var (piece, _, type) = model.Pieces[id];
            _pieces[id] = piece;
            _pieceBytes[id] = PieceToBytes(piece, type);
            _pieceIds.TryAdd(piece, id);
        }
        _bpe = new SentencePieceBpe(model, UnknownId, sentencePiece.ByteFallback);

        _addedTokenIds = new Dictionary<string, int>(config.AddedTokens, StringComparer.Ordinal);
        _addedTokenContents = config.AddedTokens.ToDictionary(kv => kv.Value, kv => kv.Key);
        VocabSize = Math.Max(_pieces.Length, _addedTokenContents.Count == 0 ? 0 : _addedTokenContents.Keys.Max() + 1);
        _splitter = new AddedTokenSplitter(_addedTokenIds);

        _specialIds = [BosId, EosId, UnknownId];
        foreach (var content in config.SpecialTokenContents)
            if (TryTokenToId(content, out var id)) _specialIds.Add(id);
        PadId = config.PadToken is { } pad && TryTokenToId(pad, out var padId) ? padId : EosId;

        _imStartId = TryTokenToId(ImStartToken, out var v) ? v : -1;
        _imEndId = TryTokenToId(ImEndToken, out v) ? v : -1;
        _imgStartId = TryTokenToId(ImgStartToken, out v) ? v : -1;
        _imgEndId = TryTokenToId(ImgEndToken, out v) ? v : -1;
        _imgContextId = TryTokenToId(ImgContextToken, out v) ? v : -1;
    }

    /// <summary>
    /// Loads <c>tokenizer.model</c> plus the added tokens of <c>tokenizer_config.json</c> (<c>added_tokens_decoder</c>)
    /// and <c>added_tokens.json</c> from a checkpoint folder.
    /// </summary>
    public static InternLM2Tokenizer Load(string modelDir)
    {
        var modelPath = Path.Combine(modelDir, "tokenizer.model");
        if (!File.Exists(modelPath))
            throw new VlmTuneException($"Tokenizer not found: '{modelPath}' does not exist. Point at an InternVL2 checkpoint folder (it holds tokenizer.model).");
        var config = TokenizerFileConfig.Read(modelDir);
        SentencePieceTokenizer sentencePiece;
        var model = SentencePieceModelFile.Read(modelPath);
        if (model.PrecompiledCharsMapName is { } normalizerName)
            throw new VlmTuneException($"'{modelPath}' normalizes text with '{normalizerName}' (a precompiled character map), which " +
                                       "VlmTune does not implement; InternLM2 tokenizers use 'identity'.");
        try
        {
            using var stream = File.OpenRead(modelPath);
            // BOS/EOS are added here, not by sentencepiece, so that they follow tokenizer_config.json.
            sentencePiece = SentencePieceTokenizer.Create(stream, addBeginningOfSentence: false, addEndOfSentence: false,
                specialTokens: config.AddedTokens);
        }
        catch (Exception e) when (e is not VlmTuneException)
        {
            throw new VlmTuneException($"Cannot read the sentencepiece model '{modelPath}': {e.Message}", e);
        }
        if (sentencePiece.Vocabulary.Count != model.Pieces.Count)
            throw new VlmTuneException($"'{modelPath}': {model.Pieces.Count} pieces in the file, but {sentencePiece.Vocabulary.Count} loaded.");
        foreach (var (content, id) in config.AddedTokens)
            if (id < model.Pieces.Count && model.Pieces[id].Type is PieceType.Normal or PieceType.Byte && model.Pieces[id].Piece != content)
                throw new VlmTuneException($"Added token '{content}' of '{modelDir}' has id {id}, which is an ordinary piece " +
                                           $"('{model.Pieces[id].Piece}') of tokenizer.model: the tokenizer files do not belong together.");
        return new InternLM2Tokenizer(modelDir, sentencePiece, model, config);
    }

    /// <summary>Token ids of <paramref name="text"/>; added tokens written in the text become their single ids.</summary>
    /// <param name="addBos">
    /// Add the tokenizer's own special tokens, as HF's <c>add_special_tokens=True</c>: BOS when <c>add_bos_token</c> (on for
    /// InternLM2), EOS when <c>add_eos_token</c> (off). False gives the bare ids of the text.
    /// </param>
    public int[] Encode(string text, bool addBos = true)
    {
        ArgumentNullException.ThrowIfNull(text);
        var ids = new List<int>(text.Length / 2 + 2);
        if (addBos && AddBosToken) ids.Add(BosId);
        foreach (var (start, length, addedId) in _splitter.Split(text))
        {
            if (addedId >= 0) { ids.Add(addedId); continue; }
            // Each piece of text on its own, as HF's _tokenize: sentencepiece normalization ("▁" for spaces, and the
            // dummy prefix where the model asks for it — InternLM2's does not), then BPE.
            var normalized = _sentencePiece.Normalizer is { } normalizer
                ? normalizer.Normalize(text.AsSpan(start, length))
                : text.Substring(start, length);
            _bpe.Encode(normalized, ids);
        }
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

    /// <summary>Id of an added token (<c>&lt;|im_end|&gt;</c>) or of a sentencepiece piece (<c>▁world</c>).</summary>
    /// <exception cref="VlmTuneException">The token is not in the vocabulary.</exception>
    public int TokenToId(string token)
    {
        if (TryTokenToId(token, out var id)) return id;
        throw new VlmTuneException($"Token '{token}' is not in the vocabulary of the tokenizer in '{ModelDir}' " +
                                   $"(neither an added token of tokenizer_config.json/added_tokens.json nor a piece of tokenizer.model).");
    }

    public bool TryTokenToId(string token, out int id)
    {
        ArgumentNullException.ThrowIfNull(token);
        return _addedTokenIds.TryGetValue(token, out id) || TryPieceToId(token, out id);
    }

    /// <summary>The token text of <paramref name="id"/>: an added token's content, else the sentencepiece piece.</summary>
    public string IdToToken(int id)
    {
        if (_addedTokenContents.TryGetValue(id, out var content)) return content;
        if ((uint)id < (uint)_pieces.Length) return _pieces[id];
        throw new VlmTuneException($"Token id {id} is outside the vocabulary (0..{VocabSize - 1}) of the tokenizer in '{ModelDir}'.");
    }

    /// <summary>Whether <paramref name="id"/> is a special token (dropped by <c>skip_special_tokens</c>).</summary>
    public bool IsSpecial(int id) => _specialIds.Contains(id);

    /// <summary>Whether <paramref name="id"/> is an added token (written as its text, never as sentencepiece bytes).</summary>
    public bool IsAddedToken(int id) => _addedTokenContents.ContainsKey(id);

    /// <summary>The bytes a sentencepiece id decodes to (empty for control pieces); added tokens are not pieces.</summary>
    internal ReadOnlySpan<byte> PieceBytes(int id)
    {
        if ((uint)id >= (uint)_pieceBytes.Length)
            throw new VlmTuneException($"Token id {id} is outside the vocabulary (0..{VocabSize - 1}) of the tokenizer in '{ModelDir}'.");
        return _pieceBytes[id];
    }

    /// <summary>Sentencepiece drops the space of the first piece when the model adds a dummy prefix (not InternLM2's).</summary>
    internal bool StripLeadingSpaceOnDecode => _stripLeadingSpaceOnDecode;

    private bool TryPieceToId(string piece, out int id) => _pieceIds.TryGetValue(piece, out id);

    private int Required(int id, string token) => id >= 0
        ? id
        : throw new VlmTuneException($"The tokenizer in '{ModelDir}' has no '{token}' token; InternVL2 needs it " +
                                     "(it is an added token of tokenizer_config.json / added_tokens.json).");

    private static byte[] PieceToBytes(string piece, PieceType type) => type switch
    {
        PieceType.Control => [],                                            // <s>, </s> print nothing
        PieceType.Unknown => Encoding.UTF8.GetBytes(UnknownSurface),
        PieceType.Byte when BytePiece().Match(piece) is { Success: true } m => [Convert.ToByte(m.Groups[1].Value, 16)],
        _ => Encoding.UTF8.GetBytes(piece.Replace('\u2581', ' ')),
    };

    [GeneratedRegex("^<0x([0-9A-Fa-f]{2})>$")]
    private static partial Regex BytePiece();
}
