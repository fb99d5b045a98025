using System.Text.Json;
using static TorchSharp.torch;

namespace VlmTune.Checkpoints;

/// <summary>
/// Writes safetensors files the way the reference writer does: an 8-byte little-endian header size, a JSON header
/// (<c>__metadata__</c> first, then each tensor's dtype, shape and data offsets) padded with spaces to a multiple of 8
/// bytes, then the tensors' bytes back to back. The file is written to a temporary sibling and renamed, so a reader
/// never sees half a file.
/// </summary>
public static class SafetensorsWriter
{
    /// <param name="tensors">Name → tensor (any device; written contiguous, in its own dtype), in the order to store.</param>
    /// <param name="metadata">String metadata; <c>format: pt</c> is added when absent, as PyTorch's writer does.</param>
    public static void Write(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var items = tensors.ToList();
        var layout = items.Select(t => new SafetensorsLayout(t.Key, t.Value.dtype, t.Value.shape)).ToList();
        WriteStreaming(path, layout, i => items[i].Value, disposeProduced: false, metadata);
    }

    /// <summary>
    /// Writes tensors produced one at a time, so a whole file never has to sit in memory: the header comes from
    /// <paramref name="layout"/>, then <paramref name="produce"/>(i) is called for each entry in order and must return a
    /// tensor of exactly that dtype and shape.
    /// </summary>
    /// <param name="disposeProduced">Dispose each produced tensor once written (it was made for this file).</param>
    public static void WriteStreaming(string path, IReadOnlyList<SafetensorsLayout> layout, Func<int, Tensor> produce,
        bool disposeProduced, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var header = Header(layout, metadata);
        string full = System.IO.Path.GetFullPath(path);
        string temp = IO.OwnedTemporary.Beside(full);
        try
        {
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                Span<byte> size = stackalloc byte[8];
                BitConverter.TryWriteBytes(size, (ulong)header.Length);
                stream.Write(size);
                stream.Write(header);
                for (int i = 0; i < layout.Count; i++)
                {
                    var entry = layout[i];
                    var t = produce(i);
                    try
                    {
                        if (t.dtype != entry.DType || !t.shape.SequenceEqual(entry.Shape))
                            throw new InvalidOperationException($"tensor '{entry.Name}' was declared {entry.DType} [{string.Join(", ", entry.Shape)}] but is {t.dtype} [{string.Join(", ", t.shape)}].");
                        if (t.numel() == 0) continue;
                        using var cpu = t.detach().cpu().contiguous();
                        stream.Write(cpu.bytes);
                    }
                    finally { if (disposeProduced) t.Dispose(); }
                }
                stream.Flush(flushToDisk: true);
            }
            File.Move(temp, full, overwrite: true);
        }
        catch
        {
            try { File.Delete(temp); } catch (IOException) { }
            throw;
        }
    }

    /// <summary>The header JSON, padded with spaces so the data section starts 8-byte aligned.</summary>
    private static byte[] Header(IReadOnlyList<SafetensorsLayout> layout, IReadOnlyDictionary<string, string>? metadata)
    {
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var e in layout)
        {
            if (e.Name == "__metadata__") throw new ArgumentException("'__metadata__' cannot name a tensor.");
            if (!names.Add(e.Name)) throw new ArgumentException($"tensor '{e.Name}' is listed twice.");
        }

        var meta = new Dictionary<string, string>(StringComparer.Ordinal) { ["format"] = "pt" };
        if (metadata is not null) foreach (var (k, v) in metadata) meta[k] = v;

        using var ms = new MemoryStream();
        using (var json = new Utf8JsonWriter(ms))
        {
            json.WriteStartObject();
            json.WriteStartObject("__metadata__");
            foreach (var (k, v) in meta) json.WriteString(k, v);
            json.WriteEndObject();
            long offset = 0;
            foreach (var e in layout)
            {
                json.WriteStartObject(e.Name);
                json.WriteString("dtype", SafetensorsFile.FromScalarType(e.DType));
                json.WriteStartArray("shape");
                foreach (var d in e.Shape) json.WriteNumberValue(d);
                json.WriteEndArray();
                json.WriteStartArray("data_offsets");
                json.WriteNumberValue(offset);
                json.WriteNumberValue(offset + e.ByteLength);
                json.WriteEndArray();
                json.WriteEndObject();
                offset += e.ByteLength;
            }
            json.WriteEndObject();
        }
        int padding = (8 - (int)(ms.Length % 8)) % 8;
        for (int i = 0; i < padding; i++) ms.WriteByte((byte)' ');
        return ms.ToArray();
    }
}

/// <summary>One tensor's place in a safetensors file to be written: name, dtype and shape.</summary>
public sealed record SafetensorsLayout(string Name, ScalarType DType, long[] Shape)
{
    public long ByteLength => Shape.Aggregate(1L, (a, b) => a * b) * SafetensorsFile.DTypeSize(SafetensorsFile.FromScalarType(DType));
}
