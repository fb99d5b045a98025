using System.Buffers.Binary;
using Google.Protobuf;

namespace VlmTune.Tests.Training;

/// <summary>
/// An events file read back without the writer's code: TFRecord framing with both CRCs checked by a bitwise CRC-32C
/// written here from its definition, and the tensorflow.Event protobuf decoded by Google.Protobuf's reader.
/// </summary>
internal static class TensorBoardReader
{
    public sealed record Event(double WallTime, long Step, string? FileVersion, IReadOnlyList<(string Tag, float Value)> Values);

    /// <summary>CRC-32C from its definition: reflected polynomial 0x82F63B78, initial and final value all ones.</summary>
    public static uint Crc32C(ReadOnlySpan<byte> data)
    {
        uint crc = 0xFFFFFFFF;
        foreach (byte b in data)
        {
            crc ^= b;
            for (int k = 0; k < 8; k++) crc = (crc & 1) != 0 ? (crc >> 1) ^ 0x82F63B78 : crc >> 1;
        }
        return ~crc;
    }

    public static uint Masked(uint crc) => unchecked(((crc >> 15) | (crc << 17)) + 0xa282ead8u);

    public static List<Event> Read(string path) => Read(File.ReadAllBytes(path), path);

    public static List<Event> Read(byte[] bytes, string path)
    {
        var events = new List<Event>();
        int at = 0, record = 0;
        while (at < bytes.Length)
        {
            if (bytes.Length - at < 12) throw new InvalidDataException($"{path}: record {record}: {bytes.Length - at} bytes left, a header takes 12");
            var header = bytes.AsSpan(at, 8);
            ulong length = BinaryPrimitives.ReadUInt64LittleEndian(header);
            uint lengthCrc = BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan(at + 8, 4));
            if (lengthCrc != Masked(Crc32C(header))) throw new InvalidDataException($"{path}: record {record}: the length's CRC does not match");
            if ((ulong)(bytes.Length - at - 16) < length) throw new InvalidDataException($"{path}: record {record}: truncated");
            var data = bytes.AsSpan(at + 12, (int)length);
            uint dataCrc = BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan(at + 12 + (int)length, 4));
            if (dataCrc != Masked(Crc32C(data))) throw new InvalidDataException($"{path}: record {record}: the data's CRC does not match");
            events.Add(Decode(data.ToArray()));
            at += 16 + (int)length;
            record++;
        }
        return events;
    }

    private static Event Decode(byte[] data)
    {
        var input = new CodedInputStream(data);
        double wall = 0;
        long step = 0;
        string? version = null;
        var values = new List<(string, float)>();
        for (uint tag; (tag = input.ReadTag()) != 0;)
        {
            switch (WireFormat.GetTagFieldNumber(tag), WireFormat.GetTagWireType(tag))
            {
                case (1, WireFormat.WireType.Fixed64): wall = input.ReadDouble(); break;
                case (2, WireFormat.WireType.Varint): step = input.ReadInt64(); break;
                case (3, WireFormat.WireType.LengthDelimited): version = input.ReadString(); break;
                case (5, WireFormat.WireType.LengthDelimited): values.AddRange(Summary(input.ReadBytes())); break;
                default: throw new InvalidDataException($"unexpected Event field {WireFormat.GetTagFieldNumber(tag)} (wire type {WireFormat.GetTagWireType(tag)})");
            }
        }
        return new Event(wall, step, version, values);
    }

    private static IEnumerable<(string, float)> Summary(ByteString bytes)
    {
        var summary = new CodedInputStream(bytes.ToByteArray());
        var values = new List<(string, float)>();
        for (uint tag; (tag = summary.ReadTag()) != 0;)
        {
            if (tag != WireFormat.MakeTag(1, WireFormat.WireType.LengthDelimited)) throw new InvalidDataException($"unexpected Summary tag {tag}");
            var value = new CodedInputStream(summary.ReadBytes().ToByteArray());
            string? name = null;
            float? simple = null;
            for (uint t; (t = value.ReadTag()) != 0;)
            {
                if (t == WireFormat.MakeTag(1, WireFormat.WireType.LengthDelimited)) name = value.ReadString();
                else if (t == WireFormat.MakeTag(2, WireFormat.WireType.Fixed32)) simple = value.ReadFloat();
                else throw new InvalidDataException($"unexpected Summary.Value tag {t}");
            }
            values.Add((name ?? throw new InvalidDataException("a value without a tag"), simple ?? throw new InvalidDataException($"{name}: no simple_value")));
        }
        return values;
    }
}
