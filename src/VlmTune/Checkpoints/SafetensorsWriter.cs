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
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (name, _) in items)
        {
            if (name == "__metadata__") throw new ArgumentException("'__metadata__' cannot name a tensor.");
            if (!names.Add(name)) throw new ArgumentException($"tensor '{name}' is listed twice.");
        }

        var meta = new Dictionary<string, string>(StringComparer.Ordinal) { ["format"] = "pt" };
        if (metadata is not null) foreach (var (k, v) in metadata) meta[k] = v;

        byte[] header;
        using (var ms = new MemoryStream())
        {
            using (var json = new Utf8JsonWriter(ms))
            {
                json.WriteStartObject();
                json.WriteStartObject("__metadata__");
                foreach (var (k, v) in meta) json.WriteString(k, v);
                json.WriteEndObject();
                long offset = 0;
                foreach (var (name, t) in items)
                {
                    long bytes = t.numel() * t.ElementSize;
                    json.WriteStartObject(name);
                    json.WriteString("dtype", SafetensorsFile.FromScalarType(t.dtype));
                    json.WriteStartArray("shape");
                    foreach (var d in t.shape) json.WriteNumberValue(d);
                    json.WriteEndArray();
                    json.WriteStartArray("data_offsets");
                    json.WriteNumberValue(offset);
                    json.WriteNumberValue(offset + bytes);
                    json.WriteEndArray();
                    json.WriteEndObject();
                    offset += bytes;
                }
                json.WriteEndObject();
            }
            header = ms.ToArray();
        }
        int padding = (8 - header.Length % 8) % 8;   // the data section starts 8-byte aligned

        string full = System.IO.Path.GetFullPath(path);
        string temp = full + $".tmp-{Environment.ProcessId}-{Guid.NewGuid():N}";
        try
        {
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                Span<byte> size = stackalloc byte[8];
                BitConverter.TryWriteBytes(size, (ulong)(header.Length + padding));
                stream.Write(size);
                stream.Write(header);
                for (int i = 0; i < padding; i++) stream.WriteByte((byte)' ');
                foreach (var (_, t) in items)
                {
                    if (t.numel() == 0) continue;
                    using var cpu = t.detach().cpu().contiguous();
                    stream.Write(cpu.bytes);
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
}
