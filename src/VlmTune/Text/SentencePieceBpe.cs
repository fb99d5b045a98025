using System.Text;

namespace VlmTune.Text;

/// <summary>
/// Sentencepiece's BPE segmentation (<c>bpe_model.cc</c>) of already-normalized text: start from characters
/// (user-defined pieces whole), repeatedly merge the adjacent pair whose merged piece has the highest score — on a tie the
/// leftmost pair — then map pieces to ids, unknown characters to their UTF-8 byte pieces.
/// <para>
/// Microsoft.ML.Tokenizers 2.0.1 breaks score ties the other way (rightmost pair first), so "sss" becomes s+ss there but
/// ss+s in sentencepiece and in the official tokenizer; this class exists to get those ids right.
/// </para>
/// </summary>
internal sealed class SentencePieceBpe
{
    private readonly Dictionary<string, int> _mergeable;            // normal, user-defined and unused pieces -> id
    private readonly Dictionary<string, int>.AlternateLookup<ReadOnlySpan<char>> _lookup;
    private readonly float[] _scores;
    private readonly PieceType[] _types;
    private readonly int[] _byteIds;                                 // byte value -> id of its <0xNN> piece, -1 if none
    private readonly Dictionary<char, string[]> _userDefinedByFirstChar;
    private readonly int _unknownId;
    private readonly bool _byteFallback;

    public SentencePieceBpe(SentencePieceModelFile model, int unknownId, bool byteFallback)
    {
        _unknownId = unknownId;
        _byteFallback = byteFallback;
        _mergeable = new Dictionary<string, int>(StringComparer.Ordinal);
        _scores = new float[model.Pieces.Count];
        _types = new PieceType[model.Pieces.Count];
        _byteIds = Enumerable.Repeat(-1, 256).ToArray();
        for (var id = 0; id < model.Pieces.Count; id++)
        {
            var (piece, score, type) = model.Pieces[id];
            _scores[id] = score;
            _types[id] = type;
            if (type is PieceType.Normal or PieceType.UserDefined or PieceType.Unused) _mergeable.TryAdd(piece, id);
            else if (type == PieceType.Byte && piece.Length == 6 && piece.StartsWith("<0x", StringComparison.Ordinal))
                _byteIds[Convert.ToByte(piece[3..5], 16)] = id;
        }
        _lookup = _mergeable.GetAlternateLookup<ReadOnlySpan<char>>();
        _userDefinedByFirstChar = model.Pieces.Where(p => p.Type == PieceType.UserDefined && p.Piece.Length > 0)
            .GroupBy(p => p.Piece[0])
            .ToDictionary(g => g.Key, g => g.Select(p => p.Piece).OrderByDescending(p => p.Length).ToArray());
    }

    /// <summary>Appends the ids of <paramref name="text"/> (normalized: spaces already "▁") to <paramref name="ids"/>.</summary>
    public void Encode(string text, List<int> ids)
    {
        if (text.Length == 0) return;

        // Symbols are a doubly linked list over spans of the text; a merged-away symbol has length 0.
        var start = new List<int>(text.Length);
        var length = new List<int>(text.Length);
        for (var pos = 0; pos < text.Length; pos += length[^1])
        {
            start.Add(pos);
            length.Add(UserDefinedPrefixLength(text, pos) is > 0 and var n ? n
                : char.IsHighSurrogate(text[pos]) && pos + 1 < text.Length && char.IsLowSurrogate(text[pos + 1]) ? 2 : 1);
        }
        var count = start.Count;
        var prev = new int[count];
        var next = new int[count];
        for (var i = 0; i < count; i++) { prev[i] = i - 1; next[i] = i + 1 < count ? i + 1 : -1; }

        // Highest score first; on equal scores the leftmost pair (sentencepiece's SymbolPairComparator).
        var agenda = new PriorityQueue<(int Left, int Right, int Size), (float Score, int Left)>(PairOrder.Instance);
        Dictionary<string, (string Left, string Right)>? reverseMerges = null;

        void MaybeAddPair(int left, int right)
        {
            if (left < 0 || right < 0) return;
            var size = length[left] + length[right];
            if (!_lookup.TryGetValue(text.AsSpan(start[left], size), out var id)) return;
            agenda.Enqueue((left, right, size), (_scores[id], left));
            if (_types[id] == PieceType.Unused)   // an unused piece is only a step: split it again on output
            {
                reverseMerges ??= new Dictionary<string, (string, string)>(StringComparer.Ordinal);
                reverseMerges[text.Substring(start[left], size)] =
                    (text.Substring(start[left], length[left]), text.Substring(start[right], length[right]));
            }
        }

        for (var i = 1; i < count; i++) MaybeAddPair(i - 1, i);
        while (agenda.TryDequeue(out var top, out _))
        {
            // Skip pairs made stale by an earlier merge.
            if (length[top.Left] == 0 || length[top.Right] == 0 || length[top.Left] + length[top.Right] != top.Size) continue;
            length[top.Left] = top.Size;
            next[top.Left] = next[top.Right];
            if (next[top.Right] >= 0) prev[next[top.Right]] = top.Left;
            length[top.Right] = 0;
            MaybeAddPair(prev[top.Left], top.Left);
            MaybeAddPair(top.Left, next[top.Left]);
        }

        var firstId = ids.Count;
        for (var i = 0; i != -1; i = next[i]) Emit(text.Substring(start[i], length[i]), reverseMerges, ids, firstId);
    }

    private void Emit(string piece, Dictionary<string, (string Left, string Right)>? reverseMerges, List<int> ids, int firstId)
    {
        if (!_mergeable.TryGetValue(piece, out var id))
        {
            if (_byteFallback)
            {
                foreach (var b in Encoding.UTF8.GetBytes(piece))
                    ids.Add(_byteIds[b] >= 0 ? _byteIds[b] : _unknownId);
            }
            else if (ids.Count == firstId || ids[^1] != _unknownId) ids.Add(_unknownId);   // a run of unknowns is one <unk>
            return;
        }
        if (_types[id] == PieceType.Unused && reverseMerges is not null && reverseMerges.TryGetValue(piece, out var parts))
        {
            Emit(parts.Left, reverseMerges, ids, firstId);
            Emit(parts.Right, reverseMerges, ids, firstId);
            return;
        }
        ids.Add(id);
    }

    private int UserDefinedPrefixLength(string text, int pos)
    {
        if (_userDefinedByFirstChar.TryGetValue(text[pos], out var candidates))
            foreach (var piece in candidates)
                if (text.AsSpan(pos).StartsWith(piece, StringComparison.Ordinal)) return piece.Length;
        return 0;
    }

    private sealed class PairOrder : IComparer<(float Score, int Left)>
    {
        public static readonly PairOrder Instance = new();

        public int Compare((float Score, int Left) a, (float Score, int Left) b) =>
            a.Score != b.Score ? b.Score.CompareTo(a.Score) : a.Left.CompareTo(b.Left);
    }
}
