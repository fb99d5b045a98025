using System.Text;
using System.Text.RegularExpressions;
using MlSentencePiece = Microsoft.ML.Tokenizers.SentencePieceTokenizer;
using MlSentencePieceNormalizer = Microsoft.ML.Tokenizers.SentencePieceNormalizer;

namespace VlmTune.Text;

/// <summary>
/// A sentencepiece BPE tokenizer (<c>tokenizer.model</c>) behaving like HF's slow tokenizers over it: InternLM2's
/// <c>InternLM2Tokenizer</c> and <c>LlamaTokenizer</c> (Llama 2, Phi-3-mini):
/// <list type="bullet">
/// <item>text is first split on the added tokens (<c>&lt;|im_start|&gt;</c>, <c>&lt;img&gt;</c>, <c>&lt;s&gt;</c>, ...), which
/// become single ids; every piece of text between them is encoded by sentencepiece on its own, with the model's
/// normalization. InternLM2's model has <c>add_dummy_prefix = false</c>, so no piece gets a leading "▁"
/// (<c>"assistant"</c> after <c>&lt;|im_start|&gt;</c> is <c>ass</c>+<c>istant</c>); Llama 2's has it, so every piece does
/// (<c>legacy: true</c>).</item>
/// <item><c>LlamaTokenizer</c> with <c>legacy: false</c> (Phi-3): one "▁" before the whole text (<c>add_prefix_space</c>),
/// none after added tokens, and a lone "▁" before a leading special token dropped.</item>
/// <item>BOS is prepended when <c>add_bos_token</c> (default true), EOS appended only when <c>add_eos_token</c> (default false).</item>
/// <item>decoding drops special ids (when asked) and turns the remaining pieces into bytes: "▁" is a space, byte-fallback
/// pieces <c>&lt;0xE2&gt;</c> are raw bytes, and invalid UTF-8 becomes one U+FFFD per byte, as sentencepiece does; with a
/// dummy prefix the first space is dropped.</item>
/// </list>
/// Microsoft.ML.Tokenizers' sentencepiece tokenizer loads the model (BOS/EOS/UNK ids, byte fallback) and normalizes; the
/// merges are our <see cref="SentencePieceBpe"/>, because its BPE breaks score ties differently from sentencepiece (see there).
/// </summary>
public sealed partial class SentencePieceTokenizer : TextTokenizer
{
    /// <summary>What sentencepiece prints for the unknown piece (its default <c>unk_surface</c>).</summary>
    private const string UnknownSurface = " \u2047 ";

    private readonly MlSentencePieceNormalizer? _normalizer;
    private readonly SentencePieceBpe _bpe;
    private readonly string[] _pieces;                                // sentencepiece id -> piece
    private readonly Dictionary<string, int> _pieceIds;               // piece -> sentencepiece id
    private readonly byte[][] _pieceBytes;                            // sentencepiece id -> bytes it decodes to
    private readonly bool _stripLeadingSpaceOnDecode;
    private readonly bool _llamaNonLegacy;                            // LlamaTokenizer(legacy=False)
    private readonly bool _addPrefixSpace;
    private readonly int _unknownPieceCount;                          // pieces of the text "<unk>", for the non-legacy trick

    /// <summary>Number of pieces in <c>tokenizer.model</c> (92544 for InternLM2, 32000 for Llama 2; HF's <c>vocab_size</c>).</summary>
    public int SentencePieceVocabSize => _pieces.Length;

    private SentencePieceTokenizer(string modelDir, MlSentencePiece sentencePiece, SentencePieceModelFile model,
        TokenizerFileConfig config) : base(modelDir, config)
    {
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
        _bpe = new SentencePieceBpe(model, sentencePiece.UnknownId, sentencePiece.ByteFallback);

        // HF's LlamaTokenizer(legacy=False) loads the model without its dummy prefix and adds one "▁" itself.
        var isLlama = config.TokenizerClass is "LlamaTokenizer" or "LlamaTokenizerFast";
        _llamaNonLegacy = isLlama && config.Legacy == false;
        _addPrefixSpace = config.AddPrefixSpace ?? true;
        _normalizer = sentencePiece.Normalizer is MlSentencePieceNormalizer n && _llamaNonLegacy && n.AddDummyPrefix
            ? new MlSentencePieceNormalizer(n.RemoveExtraWhiteSpaces, addDummyPrefix: false, n.EscapeWhiteSpaces,
                n.TreatWhitespaceAsSuffix, n.SpecialTokens)
            : sentencePiece.Normalizer as MlSentencePieceNormalizer;
        _stripLeadingSpaceOnDecode = _llamaNonLegacy ? _addPrefixSpace : sentencePiece.AddDummyPrefix;
        if (_llamaNonLegacy) _unknownPieceCount = EncodeModel(UnknownPieceText()).Count;

        // Token names of the files win (Phi-3: eos_token <|endoftext|>, not the model's </s>).
        var bos = config.BosToken.Given ? ResolveName(config.BosToken) : sentencePiece.BeginningOfSentenceId;
        var eos = ResolveName(config.EosToken) ?? sentencePiece.EndOfSentenceId;
        var unk = ResolveName(config.UnkToken) ?? sentencePiece.UnknownId;
        SetSpecialIds(bos, eos, unk, config.AddBosToken ?? true, config.AddEosToken ?? false);
    }

    /// <summary>
    /// Loads <c>tokenizer.model</c> plus the added tokens of <c>tokenizer_config.json</c> (<c>added_tokens_decoder</c>)
    /// and <c>added_tokens.json</c> from a checkpoint folder.
    /// </summary>
    public static new SentencePieceTokenizer Load(string modelDir)
    {
        var modelPath = Path.Combine(modelDir, "tokenizer.model");
        if (!File.Exists(modelPath))
            throw new VlmTuneException($"Tokenizer not found: '{modelPath}' does not exist. Point at a checkpoint folder that holds tokenizer.model.");
        var config = TokenizerFileConfig.Read(modelDir);
        MlSentencePiece sentencePiece;
        var model = SentencePieceModelFile.Read(modelPath);
        if (model.PrecompiledCharsMapName is { } normalizerName)
            throw new VlmTuneException($"'{modelPath}' normalizes text with '{normalizerName}' (a precompiled character map), which " +
                                       "VlmTune does not implement; InternLM2 and Llama tokenizers use 'identity'.");
        try
        {
            using var stream = File.OpenRead(modelPath);
            // BOS/EOS are added here, not by sentencepiece, so that they follow tokenizer_config.json.
            sentencePiece = MlSentencePiece.Create(stream, addBeginningOfSentence: false, addEndOfSentence: false,
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
        return new SentencePieceTokenizer(modelDir, sentencePiece, model, config);
    }

    private protected override string ModelFileNames => "tokenizer.model";

    private protected override int ModelVocabSize => _pieces.Length;

    private protected override void EncodeText(string text, List<int> ids)
    {
        if (!_llamaNonLegacy || text.Length == 0) { base.EncodeText(text, ids); return; }
        // LlamaTokenizer.tokenize (legacy=False): "▁" before the text, then the added-token split.
        text = text.Replace('\u2581', ' ');
        if (_addPrefixSpace) text = "\u2581" + text;
        var parts = SplitOnAddedTokens(text);
        if (parts.Count > 1 && parts[0] is ("\u2581", < 0) && IsSpecialContent(parts[1].Text)) parts.RemoveAt(0);
        EncodeParts(parts, ids);
    }

    private protected override void EncodeSegment(string text, List<int> ids)
    {
        if (!_llamaNonLegacy || !(text.StartsWith('\u2581') || text.StartsWith(' ')))
        {
            ids.AddRange(EncodeModel(text));
            return;
        }
        // LlamaTokenizer._tokenize: encode "<unk>" + text and drop the pieces of "<unk>", so that the leading "▁" is
        // kept as the text has it.
        var all = EncodeModel(UnknownPieceText() + text);
        ids.AddRange(all.Count >= _unknownPieceCount ? all.Skip(_unknownPieceCount) : all);
    }

    /// <summary>The sentencepiece ids of one piece of text: the model's normalization, then BPE.</summary>
    private List<int> EncodeModel(string text)
    {
        var ids = new List<int>();
        if (text.Length == 0) return ids;
        var normalized = _normalizer is { } normalizer ? normalizer.Normalize(text) : text;
        _bpe.Encode(normalized, ids);
        return ids;
    }

    private string UnknownPieceText() => Config.UnkToken.Content ?? _pieces[UnknownId ?? 0];

    private bool IsSpecialContent(string content) => TryTokenToId(content, out var id) && IsSpecial(id);

    private protected override bool TryModelTokenToId(string token, out int id) => _pieceIds.TryGetValue(token, out id);

    private protected override string? ModelIdToToken(int id) => (uint)id < (uint)_pieces.Length ? _pieces[id] : null;

    internal override ReadOnlySpan<byte> TokenBytes(int id)
    {
        if ((uint)id >= (uint)_pieceBytes.Length) throw OutOfVocabulary(id);
        return _pieceBytes[id];
    }

    internal override Utf8Replacement InvalidUtf8 => Utf8Replacement.PerByte;

    /// <summary>Sentencepiece drops the space of the first piece when the model adds a dummy prefix (not InternLM2's).</summary>
    internal override bool StripLeadingSpaceOnDecode => _stripLeadingSpaceOnDecode;

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
