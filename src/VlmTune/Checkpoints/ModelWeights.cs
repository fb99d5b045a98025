using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Checkpoints;

/// <summary>
/// A model folder's weights under the official InternVL names, whatever layout the folder stores: the names every
/// module, adapter, merge and cache of VlmTune uses. An hf-layout folder is read through <see cref="HfLayout"/>'s key
/// map (renamed, the ViT's q/k/v projections joined into attn.qkv as they are read); a stored name the map does not
/// know is refused when the folder is opened.
/// </summary>
public sealed class ModelWeights : ITensorSource, IDisposable
{
    private readonly CheckpointFolder _folder;
    private readonly InternVLConfig _config;
    private readonly Dictionary<string, HfLayout.StoredTensors>? _stored;   // official name → hf tensor(s); null: official layout
    private readonly Dictionary<string, SafetensorsEntry> _entries;

    public string Directory => _folder.Directory;
    public IReadOnlyCollection<string> Names => _entries.Keys;

    string ITensorSource.Location => _folder.Directory;
    IEnumerable<string> ITensorSource.Names => _entries.Keys;

    private ModelWeights(CheckpointFolder folder, InternVLConfig config, Dictionary<string, HfLayout.StoredTensors>? stored)
    {
        _folder = folder; _config = config; _stored = stored;
        _entries = stored is null
            ? folder.Names.ToDictionary(n => n, folder.Entry, StringComparer.Ordinal)
            : stored.ToDictionary(kv => kv.Key, kv => JoinedEntry(kv.Key, kv.Value), StringComparer.Ordinal);
    }

    /// <summary>Opens the weights of <paramref name="directory"/>, laid out as <paramref name="config"/> (its config.json) says.</summary>
    public static ModelWeights Open(string directory, InternVLConfig config)
    {
        var folder = CheckpointFolder.Open(directory);
        try
        {
            var stored = config.Layout == CheckpointLayout.Hf ? HfLayout.ReadPlan(folder.Names, folder.Directory) : null;
            return new ModelWeights(folder, config, stored);
        }
        catch
        {
            folder.Dispose();
            throw;
        }
    }

    public bool Contains(string name) => _entries.ContainsKey(name);

    public SafetensorsEntry Entry(string name) => _entries.TryGetValue(name, out var e)
        ? e
        : throw new CheckpointException($"{Directory}: missing tensor '{StoredName(name)}'.");

    public string FileOf(string name) => _folder.FileOf(_stored is null ? name : _stored[name].Names[0]);

    /// <summary>The stored name(s), for messages: the hf names of an hf folder (those it would have, for a tensor it lacks).</summary>
    public string StoredName(string name) =>
        _stored is null ? name
        : _stored.TryGetValue(name, out var s) ? string.Join("', '", s.Names)
        : HfLayout.DescribeHfName(name);

    /// <summary>Reads a tensor into new CPU memory in its stored dtype (a fused q/k/v joined from its three parts).</summary>
    public Tensor Read(string name)
    {
        if (_stored is null) return _folder.Read(name);
        if (!_stored.TryGetValue(name, out var s)) throw new CheckpointException($"{Directory}: missing tensor '{StoredName(name)}'.");
        if (s.Fused is null) return _folder.Read(s.Names[0]);
        using var scope = NewDisposeScope();
        var parts = s.Names.Select(_folder.Read).ToList();
        return s.Fused.Join(parts, _config).MoveToOuterDisposeScope();
    }

    /// <summary>The entry an official tensor has: a stored one renamed, or the three parts' joint shape (placed at the first).</summary>
    private SafetensorsEntry JoinedEntry(string official, HfLayout.StoredTensors stored)
    {
        var parts = stored.Names.Select(_folder.Entry).ToList();
        if (stored.Fused is null) return parts[0] with { Name = official };
        if (parts.Select(p => p.DType).Distinct().Count() > 1 || parts.Any(p => p.Shape.Length != parts[0].Shape.Length || !p.Shape[1..].SequenceEqual(parts[0].Shape[1..])))
            throw new CheckpointException($"{Directory}: '{string.Join("', '", stored.Names)}' must share dtype and trailing shape to form '{official}' (got {string.Join(", ", parts.Select(p => $"{p.DType} [{string.Join(", ", p.Shape)}]"))}).");
        long[] shape = [parts.Sum(p => p.Shape[0]), .. parts[0].Shape[1..]];
        return new SafetensorsEntry(official, parts[0].DType, shape, parts[0].Begin, parts[0].Begin + parts.Sum(p => p.ByteLength));
    }

    public void Dispose() => _folder.Dispose();
}
