using System.Text.Json;

namespace VlmTune.Data;

/// <summary>The layout of a training data file.</summary>
public enum DataFileFormat
{
    /// <summary>One JSON record per line (<c>.jsonl</c>).</summary>
    JsonLines,
    /// <summary>A JSON array of records.</summary>
    JsonArray,
    /// <summary>An InternVL meta file: <c>{"name": {"root", "annotation", "repeat_time", ...}}</c>.</summary>
    Meta,
}

/// <summary>
/// The one loader of training data. Reads InternVL chat records (JSON array or JSONL), OpenAI-style
/// <c>messages</c> records, and InternVL meta files naming several such files, always streaming: a file is read
/// record by record and never held whole. See docs/data.md.
/// </summary>
public static class TrainingData
{
    /// <summary>
    /// Every record of <paramref name="path"/> as a sample or a problem, in order; meta files expand to their
    /// datasets in order, each with its repeat_time. Images resolve against <paramref name="imageRoot"/> (default: the
    /// data file's folder); a meta file's datasets use their own <c>root</c>.
    /// </summary>
    public static IEnumerable<DataEntry> ReadEntries(string path, string? imageRoot = null)
    {
        var full = Path.GetFullPath(path);
        if (!File.Exists(full)) throw new VlmTuneException($"training data file not found: {full}");
        if (DetectFormat(full) == DataFileFormat.Meta)
        {
            if (imageRoot is not null)
                throw new VlmTuneException($"{full} is an InternVL meta file: each dataset's images are found under its own 'root', so leave out the image root");
            return MetaFile.Load(full).SelectMany(ReadDataset);
        }
        return ReadFile(full, new ImagePaths(imageRoot ?? Path.GetDirectoryName(full)!), dataset: null, maxDynamicPatch: null);
    }

    /// <summary>Every sample of <paramref name="path"/>; throws <see cref="DataFormatException"/> at the first bad record.</summary>
    public static IEnumerable<TrainingSample> Read(string path, string? imageRoot = null)
    {
        foreach (var entry in ReadEntries(path, imageRoot))
        {
            if (entry.Problem is not null) throw new DataFormatException(entry.Problem);
            yield return entry.Sample!;
        }
    }

    /// <summary>
    /// <c>.jsonl</c> is JSON lines; otherwise the first character decides: <c>[</c> a JSON array, <c>{</c> a meta
    /// file (records one per line belong in a <c>.jsonl</c> file).
    /// </summary>
    public static DataFileFormat DetectFormat(string path)
    {
        if (path.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase)) return DataFileFormat.JsonLines;
        using var stream = File.OpenRead(path);
        int b;
        do b = stream.ReadByte(); while (b is ' ' or '\t' or '\r' or '\n' or 0xEF or 0xBB or 0xBF);
        return b switch
        {
            '[' => DataFileFormat.JsonArray,
            '{' => DataFileFormat.Meta,
            -1 => throw new VlmTuneException($"{path} is empty"),
            _ => throw new VlmTuneException($"{path} is neither a JSON array of records nor an InternVL meta file (first character '{(char)b}'); JSON lines files must end in .jsonl"),
        };
    }

    /// <summary>How many records a data file holds (a streaming pass that parses nothing but the array structure).</summary>
    public static long CountRecords(string path) =>
        (DetectFormat(path) == DataFileFormat.JsonLines ? JsonRecords.ReadLines(path, parse: false) : JsonRecords.ReadArray(path, parse: false))
        .LongCount(r => r.Error is null);

    private static IEnumerable<DataEntry> ReadDataset(MetaDataset dataset)
    {
        var images = new ImagePaths(dataset.Root);
        if (dataset.RepeatTime < 1)
        {
            // InternVL keeps the first int(len * repeat_time) records.
            var keep = (long)Math.Truncate(CountRecords(dataset.Annotation) * dataset.RepeatTime);
            return ReadFile(dataset.Annotation, images, dataset.Name, dataset.MaxDynamicPatch).Take(checked((int)keep));
        }
        var times = (int)dataset.RepeatTime;
        return Enumerable.Range(0, times).SelectMany(_ => ReadFile(dataset.Annotation, images, dataset.Name, dataset.MaxDynamicPatch));
    }

    private static IEnumerable<DataEntry> ReadFile(string file, ImagePaths images, string? dataset, int? maxDynamicPatch)
    {
        var format = DetectFormat(file);
        if (format == DataFileFormat.Meta)
            throw new VlmTuneException($"{file} is a meta file, but meta files cannot name other meta files; give a .jsonl or .json array annotation");
        var records = format == DataFileFormat.JsonLines ? JsonRecords.ReadLines(file) : JsonRecords.ReadArray(file);
        foreach (var record in records)
        {
            var source = new SampleSource(file, record.Line, record.Index);
            if (record.Error is not null)
            {
                yield return DataEntry.Of(new DataProblem(DataProblemKind.BadJson, source, record.Error));
                continue;
            }
            using var doc = record.Document!;
            yield return SampleParser.Parse(doc.RootElement, source, images, dataset, maxDynamicPatch);
        }
    }
}
