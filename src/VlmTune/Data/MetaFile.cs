using System.Text.Json;

namespace VlmTune.Data;

/// <summary>One dataset of an InternVL meta file, paths made absolute.</summary>
public sealed record MetaDataset(
    string Name,
    string Root,
    string Annotation,
    double RepeatTime,
    long? Length,
    bool DataAugment,
    int? MaxDynamicPatch);

/// <summary>
/// InternVL meta files (<c>internvl_chat/shell/data/*.json</c>): an object of datasets, each
/// <c>{"root", "annotation", "repeat_time", "length", "data_augment"[, "max_dynamic_patch"]}</c>. Relative
/// <c>root</c> and <c>annotation</c> paths are taken from the meta file's folder. <c>repeat_time</c> below 1 keeps
/// that fraction of the records (a prefix, as InternVL does); above 1 it must be a whole number of repeats.
/// </summary>
public static class MetaFile
{
    /// <summary>The datasets in file order; every problem in the file is reported at once.</summary>
    public static IReadOnlyList<MetaDataset> Load(string path)
    {
        var full = Path.GetFullPath(path);
        var folder = Path.GetDirectoryName(full)!;
        JsonDocument doc;
        try
        {
            using var stream = File.OpenRead(full);
            doc = JsonDocument.Parse(stream);
        }
        catch (JsonException e)
        {
            throw new VlmTuneException($"{full}:{(e.LineNumber ?? 0) + 1}: not a valid InternVL meta file ({e.Message}). Records one per line belong in a .jsonl file.");
        }
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
                throw new VlmTuneException($"{full}: an InternVL meta file is an object of datasets, found a {doc.RootElement.ValueKind}");
            var problems = new List<string>();
            var datasets = new List<MetaDataset>();
            foreach (var property in doc.RootElement.EnumerateObject())
            {
                var name = property.Name;
                var d = property.Value;
                if (d.ValueKind != JsonValueKind.Object) { problems.Add($"'{name}' must be an object with root and annotation"); continue; }
                var root = String(d, "root", name, problems);
                var annotation = String(d, "annotation", name, problems);
                var repeat = 1.0;
                if (d.TryGetProperty("repeat_time", out var r))
                {
                    if (r.ValueKind != JsonValueKind.Number) problems.Add($"'{name}'.repeat_time must be a number");
                    else
                    {
                        repeat = r.GetDouble();
                        if (repeat < 0) problems.Add($"'{name}'.repeat_time is {repeat}; it must not be negative");
                        else if (repeat > 1 && repeat != Math.Floor(repeat))
                            problems.Add($"'{name}'.repeat_time is {repeat}; above 1 it must be a whole number of repeats (below 1 it keeps that fraction)");
                    }
                }
                long? length = null;
                if (d.TryGetProperty("length", out var l))
                {
                    if (l.ValueKind == JsonValueKind.Number && l.TryGetInt64(out var n)) length = n;
                    else if (l.ValueKind == JsonValueKind.String && long.TryParse(l.GetString(), out var s)) length = s;
                }
                var augment = d.TryGetProperty("data_augment", out var a) && a.ValueKind == JsonValueKind.True;
                int? maxPatch = null;
                if (d.TryGetProperty("max_dynamic_patch", out var m))
                {
                    if (m.ValueKind == JsonValueKind.Number && m.TryGetInt32(out var p) && p >= 1) maxPatch = p;
                    else problems.Add($"'{name}'.max_dynamic_patch must be a whole number of at least 1");
                }
                if (root is null || annotation is null) continue;
                var rootFull = Path.GetFullPath(root, folder);
                var annotationFull = Path.GetFullPath(annotation, folder);
                if (!Directory.Exists(rootFull)) problems.Add($"'{name}'.root {rootFull} is not a folder");
                if (!File.Exists(annotationFull)) problems.Add($"'{name}'.annotation {annotationFull} does not exist");
                datasets.Add(new MetaDataset(name, rootFull, annotationFull, repeat, length, augment, maxPatch));
            }
            if (problems.Count == 0 && datasets.Count == 0) problems.Add("it names no datasets");
            if (problems.Count > 0)
                throw new VlmTuneException($"{full}: invalid InternVL meta file:\n  " + string.Join("\n  ", problems));
            return datasets;
        }
    }

    private static string? String(JsonElement d, string field, string name, List<string> problems)
    {
        if (d.TryGetProperty(field, out var v) && v.ValueKind == JsonValueKind.String && v.GetString()!.Length > 0) return v.GetString();
        problems.Add($"'{name}' needs '{field}' (a path)");
        return null;
    }
}
