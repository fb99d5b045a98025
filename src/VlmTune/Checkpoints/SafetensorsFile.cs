using System.IO.MemoryMappedFiles;
using System.Text;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace VlmTune.Checkpoints;

/// <summary>One tensor's entry in a safetensors header.</summary>
public sealed record SafetensorsEntry(string Name, string DType, long[] Shape, long Begin, long End)
{
    public long ByteLength => End - Begin;
}

/// <summary>
/// A memory-mapped, lazily read safetensors file. The header is validated the way the reference Rust loader does
/// (size bounds, UTF-8 JSON, contiguous offsets from 0, shape × dtype size equal to the byte span, nothing left over);
/// tensor bytes are copied straight from the mapping into native tensor memory when asked for, never into managed arrays.
/// </summary>
public sealed class SafetensorsFile : ITensorSource, IDisposable
{
    public const long MaxHeaderSize = 100_000_000;

    private readonly MemoryMappedFile? _map;
    private readonly MemoryMappedViewAccessor? _view;
    private readonly long _dataStart;

    public string Path { get; }
    public IReadOnlyDictionary<string, SafetensorsEntry> Entries { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }

    private SafetensorsFile(string path, MemoryMappedFile? map, MemoryMappedViewAccessor? view, long dataStart,
        Dictionary<string, SafetensorsEntry> entries, Dictionary<string, string> metadata)
    {
        Path = path; _map = map; _view = view; _dataStart = dataStart; Entries = entries; Metadata = metadata;
    }

    public static SafetensorsFile Open(string path)
    {
        if (!File.Exists(path)) throw new CheckpointException($"{path}: file not found.");
        long length = new FileInfo(path).Length;
        byte[] header;
        using (var stream = File.OpenRead(path)) header = ReadHeaderBytes(stream, length, path);
        var (entries, metadata) = ParseHeader(header, length - 8 - header.Length, path);
        if (length == 0) return new SafetensorsFile(path, null, null, 0, entries, metadata);
        var map = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
        var view = map.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);
        return new SafetensorsFile(path, map, view, 8 + header.Length, entries, metadata);
    }

    private static byte[] ReadHeaderBytes(Stream stream, long length, string path)
    {
        if (length < 8) throw new CheckpointException($"{path}: truncated safetensors file ({length} bytes, need at least 8 for the header size).");
        Span<byte> size = stackalloc byte[8];
        stream.ReadExactly(size);
        ulong n = BitConverter.ToUInt64(size);
        if (n > MaxHeaderSize) throw new CheckpointException($"{path}: corrupt safetensors header: declared header size {n} exceeds {MaxHeaderSize} bytes.");
        if ((long)n > length - 8) throw new CheckpointException($"{path}: truncated safetensors file: header declares {n} bytes but only {length - 8} follow.");
        var bytes = new byte[n];
        stream.ReadExactly(bytes);
        return bytes;
    }

    /// <summary>Parses and validates a header; <paramref name="dataLength"/> is the byte count after the header.</summary>
    internal static (Dictionary<string, SafetensorsEntry>, Dictionary<string, string>) ParseHeader(byte[] header, long dataLength, string path)
    {
        string json;
        try { json = new UTF8Encoding(false, true).GetString(header); }
        catch (DecoderFallbackException) { throw new CheckpointException($"{path}: corrupt safetensors header: not valid UTF-8."); }
        JsonDocument doc;
        try { doc = JsonDocument.Parse(json.TrimEnd(' ')); }
        catch (JsonException e) { throw new CheckpointException($"{path}: corrupt safetensors header: invalid JSON ({e.Message})."); }
        using var _ = doc;
        if (doc.RootElement.ValueKind != JsonValueKind.Object)
            throw new CheckpointException($"{path}: corrupt safetensors header: expected a JSON object.");

        var entries = new Dictionary<string, SafetensorsEntry>(StringComparer.Ordinal);
        var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var prop in doc.RootElement.EnumerateObject())
        {
            if (prop.Name == "__metadata__")
            {
                if (prop.Value.ValueKind != JsonValueKind.Object) throw new CheckpointException($"{path}: corrupt safetensors header: __metadata__ must be an object of strings.");
                foreach (var m in prop.Value.EnumerateObject())
                {
                    if (m.Value.ValueKind != JsonValueKind.String) throw new CheckpointException($"{path}: corrupt safetensors header: __metadata__.{m.Name} must be a string.");
                    metadata[m.Name] = m.Value.GetString()!;
                }
                continue;
            }
            entries[prop.Name] = ParseEntry(prop, path);
        }

        long expected = 0;
        foreach (var e in entries.Values.OrderBy(e => e.Begin).ThenBy(e => e.End))
        {
            if (e.Begin != expected)
                throw new CheckpointException($"{path}: corrupt safetensors header: tensor '{e.Name}' starts at byte {e.Begin}, expected {expected} (offsets must be contiguous with no gap or overlap).");
            if (e.End < e.Begin) throw new CheckpointException($"{path}: corrupt safetensors header: tensor '{e.Name}' ends before it starts.");
            long elements = 1;
            foreach (var d in e.Shape)
            {
                if (d < 0) throw new CheckpointException($"{path}: corrupt safetensors header: tensor '{e.Name}' has a negative dimension.");
                try { elements = checked(elements * d); }
                catch (OverflowException) { throw new CheckpointException($"{path}: corrupt safetensors header: tensor '{e.Name}' shape overflows."); }
            }
            long bytes;
            try { bytes = checked(elements * DTypeSize(e.DType)); }
            catch (OverflowException) { throw new CheckpointException($"{path}: corrupt safetensors header: tensor '{e.Name}' size overflows."); }
            if (bytes != e.ByteLength)
                throw new CheckpointException($"{path}: corrupt safetensors header: tensor '{e.Name}' has shape [{string.Join(", ", e.Shape)}] of {e.DType} ({bytes} bytes) but spans {e.ByteLength} bytes.");
            expected = e.End;
        }
        if (expected != dataLength)
            throw new CheckpointException(expected > dataLength
                ? $"{path}: truncated safetensors file: tensors need {expected} data bytes but the file holds {dataLength}."
                : $"{path}: corrupt safetensors file: {dataLength - expected} bytes after the last tensor.");
        return (entries, metadata);
    }

    private static SafetensorsEntry ParseEntry(JsonProperty prop, string path)
    {
        string where = $"{path}: corrupt safetensors header: tensor '{prop.Name}'";
        var v = prop.Value;
        if (v.ValueKind != JsonValueKind.Object) throw new CheckpointException($"{where} is not an object.");
        if (!v.TryGetProperty("dtype", out var dt) || dt.ValueKind != JsonValueKind.String) throw new CheckpointException($"{where} has no dtype.");
        string dtype = dt.GetString()!;
        DTypeSize(dtype, where);
        if (!v.TryGetProperty("shape", out var sh) || sh.ValueKind != JsonValueKind.Array) throw new CheckpointException($"{where} has no shape.");
        var shape = new List<long>();
        foreach (var d in sh.EnumerateArray())
        {
            if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt64(out long x) || x < 0) throw new CheckpointException($"{where} has an invalid shape.");
            shape.Add(x);
        }
        if (!v.TryGetProperty("data_offsets", out var off) || off.ValueKind != JsonValueKind.Array || off.GetArrayLength() != 2)
            throw new CheckpointException($"{where} has no data_offsets [begin, end].");
        long[] o = new long[2];
        for (int i = 0; i < 2; i++)
            if (off[i].ValueKind != JsonValueKind.Number || !off[i].TryGetInt64(out o[i]) || o[i] < 0) throw new CheckpointException($"{where} has invalid data_offsets.");
        return new SafetensorsEntry(prop.Name, dtype, shape.ToArray(), o[0], o[1]);
    }

    public static long DTypeSize(string dtype, string? where = null) => dtype switch
    {
        "F64" or "I64" or "U64" => 8,
        "F32" or "I32" or "U32" => 4,
        "F16" or "BF16" or "I16" or "U16" => 2,
        "I8" or "U8" or "BOOL" or "F8_E4M3" or "F8_E5M2" => 1,
        _ => throw new CheckpointException($"{where ?? "safetensors"}: unsupported dtype '{dtype}'."),
    };

    public static ScalarType ToScalarType(string dtype) => dtype switch
    {
        "F64" => ScalarType.Float64, "F32" => ScalarType.Float32, "F16" => ScalarType.Float16, "BF16" => ScalarType.BFloat16,
        "I64" => ScalarType.Int64, "I32" => ScalarType.Int32, "I16" => ScalarType.Int16, "I8" => ScalarType.Int8,
        "U8" => ScalarType.Byte, "BOOL" => ScalarType.Bool,
        _ => throw new CheckpointException($"safetensors dtype '{dtype}' has no TorchSharp equivalent."),
    };

    public static string FromScalarType(ScalarType t) => t switch
    {
        ScalarType.Float64 => "F64", ScalarType.Float32 => "F32", ScalarType.Float16 => "F16", ScalarType.BFloat16 => "BF16",
        ScalarType.Int64 => "I64", ScalarType.Int32 => "I32", ScalarType.Int16 => "I16", ScalarType.Int8 => "I8",
        ScalarType.Byte => "U8", ScalarType.Bool => "BOOL",
        _ => throw new ArgumentException($"dtype {t} cannot be written to safetensors."),
    };

    public bool Contains(string name) => Entries.ContainsKey(name);

    /// <summary>Names of the floating-point tensors that hold NaN or infinity, in file order (read one at a time).</summary>
    public IReadOnlyList<string> NonFiniteTensors()
    {
        var bad = new List<string>();
        foreach (var e in Entries.Values.Where(e => e.DType is "F64" or "F32" or "F16" or "BF16").OrderBy(e => e.Begin))
        {
            using var scope = NewDisposeScope();
            if (!Read(e.Name).isfinite().all().item<bool>()) bad.Add(e.Name);
        }
        return bad;
    }

    string ITensorSource.Location => Path;
    IEnumerable<string> ITensorSource.Names => Entries.Keys;
    SafetensorsEntry ITensorSource.Entry(string name) => Entries[name];
    string ITensorSource.FileOf(string name) => Path;

    /// <summary>Reads one tensor into new CPU memory, in its stored dtype.</summary>
    public Tensor Read(string name)
    {
        if (!Entries.TryGetValue(name, out var e)) throw new CheckpointException($"{Path}: no tensor named '{name}'.");
        var t = empty(e.Shape, ToScalarType(e.DType));
        if (e.ByteLength > 0) CopyTo(e, t);
        return t;
    }

    private unsafe void CopyTo(SafetensorsEntry e, Tensor destination)
    {
        byte* basePtr = null;
        _view!.SafeMemoryMappedViewHandle.AcquirePointer(ref basePtr);
        try
        {
            byte* src = basePtr + _view.PointerOffset + _dataStart + e.Begin;
            // Tensor.bytes spans the tensor's native storage: one copy, mapping to native memory, nothing managed.
            fixed (byte* dst = destination.bytes)
                Buffer.MemoryCopy(src, dst, e.ByteLength, e.ByteLength);
        }
        finally { _view.SafeMemoryMappedViewHandle.ReleasePointer(); }
    }

    public void Dispose() { _view?.Dispose(); _map?.Dispose(); }
}

/// <summary>A checkpoint file or folder is missing, corrupt or does not fit the model.</summary>
public sealed class CheckpointException(string message) : VlmTuneException(message);
