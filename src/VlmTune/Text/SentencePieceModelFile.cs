namespace VlmTune.Text;

/// <summary>Kinds of sentencepiece pieces (<c>ModelProto.SentencePiece.Type</c>).</summary>
internal enum PieceType
{
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

/// <summary>
/// The pieces of a sentencepiece <c>tokenizer.model</c> with their scores and types, read straight from the protobuf.
/// Microsoft.ML.Tokenizers loads the model and normalizes text, but does not expose scores and types, which our BPE
/// (<see cref="SentencePieceBpe"/>) and decoding (byte / control pieces) need.
/// </summary>
internal sealed record SentencePieceModelFile(IReadOnlyList<(string Piece, float Score, PieceType Type)> Pieces, string? PrecompiledCharsMapName)
{
    public static SentencePieceModelFile Read(string path)
    {
        var data = File.ReadAllBytes(path);
        var pieces = new List<(string, float, PieceType)>();
        string? charsMapName = null;
        try
        {
            var pos = 0;
            while (pos < data.Length)
            {
                var (field, wire) = ReadTag(data, ref pos);
                if (field == 1 && wire == 2) pieces.Add(ReadPiece(data, ReadLengthDelimited(data, ref pos)));
                else if (field == 3 && wire == 2) charsMapName = ReadNormalizerCharsMap(data, ReadLengthDelimited(data, ref pos));
                else Skip(data, ref pos, wire);
            }
        }
        catch (Exception e) when (e is IndexOutOfRangeException or ArgumentOutOfRangeException or InvalidDataException)
        {
            throw new VlmTuneException($"'{path}' is not a valid sentencepiece model: {e.Message}", e);
        }
        return new SentencePieceModelFile(pieces, charsMapName);
    }

    private static (string, float, PieceType) ReadPiece(byte[] data, Range range)
    {
        var (start, end) = (range.Start.Value, range.End.Value);
        var piece = "";
        var score = 0f;
        var type = PieceType.Normal; // the proto's default
        var pos = start;
        while (pos < end)
        {
            var (field, wire) = ReadTag(data, ref pos);
            if (field == 1 && wire == 2) piece = System.Text.Encoding.UTF8.GetString(data[ReadLengthDelimited(data, ref pos)]);
            else if (field == 2 && wire == 5) { score = BitConverter.ToSingle(data, pos); pos += 4; }
            else if (field == 3 && wire == 0) type = (PieceType)(int)ReadVarint(data, ref pos);
            else Skip(data, ref pos, wire);
        }
        return (piece, score, type);
    }

    /// <summary>The normalizer's name when it carries a precompiled character map (NFKC and the like), else null.</summary>
    private static string? ReadNormalizerCharsMap(byte[] data, Range range)
    {
        var (pos, end) = (range.Start.Value, range.End.Value);
        string name = "?";
        var hasMap = false;
        while (pos < end)
        {
            var (field, wire) = ReadTag(data, ref pos);
            if (field == 1 && wire == 2) name = System.Text.Encoding.UTF8.GetString(data[ReadLengthDelimited(data, ref pos)]);
            else if (field == 2 && wire == 2) hasMap = ReadLengthDelimited(data, ref pos) is { } r && r.End.Value > r.Start.Value;
            else Skip(data, ref pos, wire);
        }
        return hasMap ? name : null;
    }

    private static (int Field, int Wire) ReadTag(byte[] data, ref int pos)
    {
        var tag = ReadVarint(data, ref pos);
        return ((int)(tag >> 3), (int)(tag & 7));
    }

    private static ulong ReadVarint(byte[] data, ref int pos)
    {
        ulong value = 0;
        for (var shift = 0; shift < 64; shift += 7)
        {
            var b = data[pos++];
            value |= (ulong)(b & 0x7F) << shift;
            if (b < 0x80) return value;
        }
        throw new InvalidDataException("varint longer than 10 bytes");
    }

    private static Range ReadLengthDelimited(byte[] data, ref int pos)
    {
        var length = checked((int)ReadVarint(data, ref pos));
        if (length < 0 || pos + length > data.Length) throw new InvalidDataException("field runs past the end of the file");
        var range = pos..(pos + length);
        pos += length;
        return range;
    }

    private static void Skip(byte[] data, ref int pos, int wire)
    {
        switch (wire)
        {
            case 0: ReadVarint(data, ref pos); break;
            case 1: pos += 8; break;
            case 2: ReadLengthDelimited(data, ref pos); break;
            case 5: pos += 4; break;
            default: throw new InvalidDataException($"unsupported protobuf wire type {wire}");
        }
        if (pos > data.Length) throw new InvalidDataException("field runs past the end of the file");
    }
}
