using System.Text;
using System.Text.Json.Nodes;

namespace VlmTune.Tests.Support;

/// <summary>
/// Copies the tiny fixture model into a temp folder so a test can break one thing: edit config.json, drop, add or
/// reshape tensors, or split the weights into shards. Raw bytes are copied, so untouched tensors stay bit-identical.
/// </summary>
public sealed class ModelFolderBuilder : IDisposable
{
    public string Dir { get; } = Directory.CreateTempSubdirectory("vlmtune-model-").FullName;

    private readonly List<(string Name, JsonObject Info, byte[] Bytes)> _tensors = [];
    private JsonObject _config;

    public ModelFolderBuilder()
    {
        foreach (var f in Directory.GetFiles(Fixtures.TinyModel))
            if (!f.EndsWith(".safetensors")) File.Copy(f, Path.Combine(Dir, Path.GetFileName(f)));
        _config = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.TinyModel, "config.json")))!.AsObject();
        var bytes = File.ReadAllBytes(Path.Combine(Fixtures.TinyModel, "model.safetensors"));
        long n = BitConverter.ToInt64(bytes, 0);
        var header = JsonNode.Parse(Encoding.UTF8.GetString(bytes, 8, (int)n))!.AsObject();
        foreach (var (name, node) in header)
        {
            if (name == "__metadata__") continue;
            var info = node!.AsObject();
            var off = info["data_offsets"]!.AsArray();
            long begin = (long)off[0]!, end = (long)off[1]!;
            _tensors.Add((name, (JsonObject)info.DeepClone(), bytes[(int)(8 + n + begin)..(int)(8 + n + end)]));
        }
    }

    public ModelFolderBuilder Config(Action<JsonObject> edit) { edit(_config); return this; }

    public ModelFolderBuilder Drop(string name) { _tensors.RemoveAll(t => t.Name == name); return this; }

    public ModelFolderBuilder Add(string name, string dtype, long[] shape, byte[] bytes)
    {
        _tensors.Add((name, new JsonObject { ["dtype"] = dtype, ["shape"] = new JsonArray(shape.Select(s => (JsonNode)s).ToArray()) }, bytes));
        return this;
    }

    public ModelFolderBuilder Reshape(string name, params long[] shape)
    {
        var t = _tensors.Single(t => t.Name == name);
        t.Info["shape"] = new JsonArray(shape.Select(s => (JsonNode)s).ToArray());
        return this;
    }

    /// <summary>Writes config.json and the weights: one file, or <paramref name="shards"/> files with an index.</summary>
    public string Build(int shards = 1)
    {
        File.WriteAllText(Path.Combine(Dir, "config.json"), _config.ToJsonString());
        if (shards == 1) { WriteFile(Path.Combine(Dir, "model.safetensors"), _tensors); return Dir; }
        var map = new JsonObject();
        var groups = _tensors.Select((t, i) => (t, i)).GroupBy(x => x.i % shards).ToList();
        foreach (var g in groups)
        {
            string name = $"model-{g.Key + 1:D5}-of-{shards:D5}.safetensors";
            WriteFile(Path.Combine(Dir, name), g.Select(x => x.t).ToList());
            foreach (var x in g) map[x.t.Name] = name;
        }
        File.WriteAllText(Path.Combine(Dir, "model.safetensors.index.json"), new JsonObject { ["metadata"] = new JsonObject(), ["weight_map"] = map }.ToJsonString());
        return Dir;
    }

    private static void WriteFile(string path, List<(string Name, JsonObject Info, byte[] Bytes)> tensors)
    {
        var header = new JsonObject { ["__metadata__"] = new JsonObject { ["format"] = "pt" } };
        long offset = 0;
        foreach (var (name, info, bytes) in tensors)
        {
            var copy = (JsonObject)info.DeepClone();
            copy["data_offsets"] = new JsonArray(offset, offset + bytes.Length);
            header[name] = copy;
            offset += bytes.Length;
        }
        var h = Encoding.UTF8.GetBytes(header.ToJsonString());
        using var f = File.Create(path);
        f.Write(BitConverter.GetBytes((ulong)h.Length));
        f.Write(h);
        foreach (var t in tensors) f.Write(t.Bytes);
    }

    public void Dispose() => Directory.Delete(Dir, true);
}
