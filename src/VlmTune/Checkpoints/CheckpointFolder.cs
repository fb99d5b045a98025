using System.Text.Json;
using static TorchSharp.torch;

namespace VlmTune.Checkpoints;

/// <summary>
/// The weights of an HF-layout model folder: <c>model.safetensors</c>, or shards listed by
/// <c>model.safetensors.index.json</c>. Every file is memory-mapped and validated on open; tensors are read on demand.
/// </summary>
public sealed class CheckpointFolder : ITensorSource, IDisposable
{
    public const string SingleFile = "model.safetensors";
    public const string IndexFile = "model.safetensors.index.json";

    private readonly List<SafetensorsFile> _files;
    private readonly Dictionary<string, SafetensorsFile> _owner;

    public string Directory { get; }
    public IReadOnlyCollection<string> Names => _owner.Keys;

    string ITensorSource.Location => Directory;
    IEnumerable<string> ITensorSource.Names => _owner.Keys;

    private CheckpointFolder(string directory, List<SafetensorsFile> files, Dictionary<string, SafetensorsFile> owner)
    {
        Directory = directory; _files = files; _owner = owner;
    }

    public static CheckpointFolder Open(string directory)
    {
        string index = Path.Combine(directory, IndexFile), single = Path.Combine(directory, SingleFile);
        if (File.Exists(index)) return OpenSharded(directory, index);
        if (File.Exists(single))
        {
            var file = SafetensorsFile.Open(single);
            return new CheckpointFolder(directory, [file], file.Entries.Keys.ToDictionary(k => k, _ => file));
        }
        string hint = File.Exists(Path.Combine(directory, "pytorch_model.bin")) || System.IO.Directory.EnumerateFiles(directory, "pytorch_model*.bin").Any()
            ? " It holds PyTorch .bin weights only; save them as safetensors (transformers: save_pretrained(..., safe_serialization=True))."
            : "";
        throw new CheckpointException($"{directory}: no {SingleFile} or {IndexFile} found.{hint}");
    }

    private static CheckpointFolder OpenSharded(string directory, string indexPath)
    {
        Dictionary<string, string> weightMap;
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(indexPath));
            if (!doc.RootElement.TryGetProperty("weight_map", out var map) || map.ValueKind != JsonValueKind.Object)
                throw new CheckpointException($"{indexPath}: no \"weight_map\" object.");
            weightMap = map.EnumerateObject().ToDictionary(p => p.Name, p => p.Value.ValueKind == JsonValueKind.String
                ? p.Value.GetString()!
                : throw new CheckpointException($"{indexPath}: weight_map[\"{p.Name}\"] must be a file name (a string), not {p.Value.GetRawText()}."));
        }
        catch (JsonException e) { throw new CheckpointException($"{indexPath}: invalid JSON: {e.Message}"); }

        var files = new List<SafetensorsFile>();
        var owner = new Dictionary<string, SafetensorsFile>(StringComparer.Ordinal);
        try
        {
            foreach (var shardName in weightMap.Values.Distinct())
            {
                if (shardName.Contains('/') || shardName.Contains('\\') || shardName.Contains(".."))
                    throw new CheckpointException($"{indexPath}: shard name '{shardName}' must be a file name in the model folder.");
                string shardPath = Path.Combine(directory, shardName);
                if (!File.Exists(shardPath)) throw new CheckpointException($"{shardPath}: listed in {IndexFile} but missing.");
                var shard = SafetensorsFile.Open(shardPath);
                files.Add(shard);
                foreach (var name in shard.Entries.Keys)
                    if (!owner.TryAdd(name, shard))
                        throw new CheckpointException($"{shardPath}: tensor '{name}' is also stored in {owner[name].Path}.");
            }
            foreach (var (name, shardName) in weightMap)
                if (!owner.TryGetValue(name, out var f) || Path.GetFileName(f.Path) != shardName)
                    throw new CheckpointException($"{indexPath}: tensor '{name}' is listed in {shardName} but that file does not hold it.");
        }
        catch
        {
            foreach (var f in files) f.Dispose();
            throw;
        }
        return new CheckpointFolder(directory, files, owner);
    }

    public bool Contains(string name) => _owner.ContainsKey(name);

    public SafetensorsEntry Entry(string name) => _owner.TryGetValue(name, out var f)
        ? f.Entries[name]
        : throw new CheckpointException($"{Directory}: missing tensor '{name}'.");

    public string FileOf(string name) => _owner[name].Path;

    /// <summary>Reads a tensor into new CPU memory in its stored dtype.</summary>
    public Tensor Read(string name) => _owner.TryGetValue(name, out var f)
        ? f.Read(name)
        : throw new CheckpointException($"{Directory}: missing tensor '{name}'.");

    public void Dispose()
    {
        foreach (var f in _files) f.Dispose();
    }
}
