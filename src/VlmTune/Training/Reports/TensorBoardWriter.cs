using System.Buffers.Binary;
using System.Globalization;
using System.Numerics;
using System.Text;

namespace VlmTune.Training.Reports;

/// <summary>
/// Scalars in TensorBoard's event file format (<c>report_to: tensorboard</c>), which <c>tensorboard --logdir</c> and
/// its <c>EventAccumulator</c> read while the run goes on: <c>events.out.tfevents.&lt;unix time&gt;.&lt;host&gt;</c>, a
/// sequence of TFRecords (uint64 length, masked CRC-32C of the length, the data, masked CRC-32C of the data) whose data
/// is a <c>tensorflow.Event</c>: the first one <c>file_version: "brain.Event:2"</c>, then one per logged iteration with
/// <c>summary { value { tag simple_value } }</c>.
/// </summary>
/// <remarks>
/// The protobuf is encoded by hand: five fields of two messages (Event: wall_time 1, step 2, file_version 3,
/// summary 5; Summary.Value: tag 1, simple_value 2). Google.Protobuf would need the TensorFlow .proto files and a code
/// generator in the build for what is a dozen bytes of varints and fixed-width numbers per record, and would add a
/// dependency to the library for nothing else. The tests decode the files with Google.Protobuf's reader, so the
/// encoding is checked by an independent implementation. The file is appended to and flushed record by record (no
/// temporary-and-rename: TensorBoard reads it while it grows, as TensorFlow's own writer works); a record cut by a
/// kill is what TensorBoard's reader already tolerates at the end of a file.
/// </remarks>
public sealed class TensorBoardWriter : IDisposable
{
    public const string FileVersion = "brain.Event:2";
    public const string FilePrefix = "events.out.tfevents.";

    private readonly FileStream _file;
    private readonly object _gate = new();

    public string Path { get; }

    private TensorBoardWriter(string path)
    {
        Path = path;
        _file = new FileStream(path, FileMode.CreateNew, FileAccess.Write, FileShare.Read);
    }

    /// <summary>Creates the events file in <paramref name="directory"/> and writes its file_version record.</summary>
    public static TensorBoardWriter Create(string directory, DateTimeOffset? now = null)
    {
        var time = now ?? DateTimeOffset.UtcNow;
        string host = string.Concat(Environment.MachineName.Select(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' or '.' ? c : '_'));
        string path = System.IO.Path.Combine(directory, $"{FilePrefix}{time.ToUnixTimeSeconds().ToString(CultureInfo.InvariantCulture)}.{host}");
        var writer = new TensorBoardWriter(path);
        writer.WriteRecord(EncodeEvent(WallTime(time), 0, FileVersion, []));
        return writer;
    }

    /// <summary>One event at <paramref name="step"/> holding these scalars (non-finite values are left out).</summary>
    public void Scalars(long step, IEnumerable<(string Tag, double Value)> values, DateTimeOffset? now = null)
    {
        var finite = values.Where(v => double.IsFinite(v.Value)).Select(v => (v.Tag, (float)v.Value)).ToList();
        if (finite.Count == 0) return;
        WriteRecord(EncodeEvent(WallTime(now ?? DateTimeOffset.UtcNow), step, null, finite));
    }

    private static double WallTime(DateTimeOffset t) => t.ToUnixTimeMilliseconds() / 1000.0;

    private void WriteRecord(byte[] data)
    {
        var header = new byte[12];
        BinaryPrimitives.WriteUInt64LittleEndian(header, (ulong)data.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(8), MaskedCrc32C(header.AsSpan(0, 8)));
        var footer = new byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(footer, MaskedCrc32C(data));
        lock (_gate)
        {
            _file.Write(header);
            _file.Write(data);
            _file.Write(footer);
            _file.Flush();
        }
    }

    /// <summary>tensorflow.Event { wall_time, step, file_version | summary { value { tag, simple_value } ... } }.</summary>
    internal static byte[] EncodeEvent(double wallTime, long step, string? fileVersion, IReadOnlyList<(string Tag, float Value)> values)
    {
        var e = new MemoryStream();
        e.WriteByte(1 << 3 | 1);                      // wall_time: field 1, fixed64 (double)
        Span<byte> eight = stackalloc byte[8];
        BinaryPrimitives.WriteDoubleLittleEndian(eight, wallTime);
        e.Write(eight);
        if (step != 0) { e.WriteByte(2 << 3 | 0); Varint(e, (ulong)step); }   // step: field 2, varint (proto3 leaves out 0)
        if (fileVersion is not null) LengthDelimited(e, 3, Encoding.UTF8.GetBytes(fileVersion));
        if (values.Count > 0)
        {
            var summary = new MemoryStream();
            var four = new byte[4];
            foreach (var (tag, value) in values)
            {
                var v = new MemoryStream();
                LengthDelimited(v, 1, Encoding.UTF8.GetBytes(tag));   // Summary.Value.tag
                v.WriteByte(2 << 3 | 5);                               // simple_value: field 2, fixed32 (float)
                BinaryPrimitives.WriteSingleLittleEndian(four, value);
                v.Write(four);
                LengthDelimited(summary, 1, v.ToArray());               // Summary.value (repeated)
            }
            LengthDelimited(e, 5, summary.ToArray());                   // Event.summary
        }
        return e.ToArray();
    }

    private static void LengthDelimited(Stream s, int field, byte[] bytes)
    {
        s.WriteByte((byte)(field << 3 | 2));
        Varint(s, (ulong)bytes.Length);
        s.Write(bytes);
    }

    private static void Varint(Stream s, ulong v)
    {
        for (; v >= 0x80; v >>= 7) s.WriteByte((byte)(v | 0x80));
        s.WriteByte((byte)v);
    }

    /// <summary>CRC-32C (Castagnoli) through .NET's <see cref="BitOperations.Crc32C(uint, byte)"/> (SSE4.2 / ARM CRC instructions where present).</summary>
    public static uint Crc32C(ReadOnlySpan<byte> data)
    {
        uint crc = ~0u;
        int i = 0;
        for (; i + 8 <= data.Length; i += 8) crc = BitOperations.Crc32C(crc, BinaryPrimitives.ReadUInt64LittleEndian(data[i..]));
        for (; i < data.Length; i++) crc = BitOperations.Crc32C(crc, data[i]);
        return ~crc;
    }

    /// <summary>TFRecord's mask: rotate right by 15 and add a constant, so that CRCs of CRCs stay well distributed.</summary>
    public static uint MaskedCrc32C(ReadOnlySpan<byte> data)
    {
        uint crc = Crc32C(data);
        return unchecked(((crc >> 15) | (crc << 17)) + 0xa282ead8u);
    }

    public void Dispose()
    {
        lock (_gate) _file.Dispose();
    }
}
