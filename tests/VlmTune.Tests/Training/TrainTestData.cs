using System.Text.Json;
using VlmTune.Tests.Support;
using VlmTune.Training;

namespace VlmTune.Tests.Training;

/// <summary>A small generated training set (fixture images copied into a temp folder) and configs for the tiny model.</summary>
internal sealed class TrainTestData : IDisposable
{
    public string Dir { get; } = Path.Combine(Path.GetTempPath(), "vlmtune-train-" + Guid.NewGuid().ToString("N"));
    public string DataFile => Path.Combine(Dir, "data.jsonl");
    public string WorkDir => Path.Combine(Dir, "work");

    /// <param name="samples">Samples to write: images alternate between two fixture pictures; every third is text-only.</param>
    /// <param name="broken">Image files (relative names) to write as broken and reference from extra samples.</param>
    public TrainTestData(int samples = 12, IReadOnlyDictionary<string, byte[]>? broken = null, int brokenAt = 3)
    {
        Directory.CreateDirectory(Path.Combine(Dir, "images"));
        File.Copy(Path.Combine(Fixtures.TinyDir, "images", "tiny.png"), Path.Combine(Dir, "images", "tiny.png"));
        File.Copy(Path.Combine(Fixtures.TinyDir, "images", "clot.jpg"), Path.Combine(Dir, "images", "clot.jpg"));
        var lines = new List<string>();
        for (int i = 0; i < samples; i++)
        {
            object record = (i % 3) switch
            {
                0 => Record(i, "images/tiny.png", "<image>\nWhat is in the picture?", "A tiny picture of a cat."),
                1 => Record(i, "images/clot.jpg", "<image>\nTell a joke about this photo.", "The cat sat on the mat."),
                _ => new { id = $"s{i}", conversations = Turns("Say hello.", "Hello there, friend!") },
            };
            lines.Add(JsonSerializer.Serialize(record));
            if (broken is not null && i == brokenAt)
                foreach (var name in broken.Keys)
                    lines.Add(JsonSerializer.Serialize(Record(1000 + lines.Count, $"images/{name}", "<image>\nWhat is this?", "Broken.")));
        }
        if (broken is not null)
            foreach (var (name, bytes) in broken) File.WriteAllBytes(Path.Combine(Dir, "images", name), bytes);
        File.WriteAllLines(DataFile, lines);
    }

    private static object Record(int i, string image, string question, string answer) =>
        new { id = $"s{i}", image, conversations = Turns(question, answer) };

    private static object[] Turns(string question, string answer) =>
        [new { from = "human", value = question }, new { from = "gpt", value = answer }];

    /// <summary>A CPU config for the tiny model on this data; overrides as --set key=value.</summary>
    public TrainConfig Config(params string[] overrides)
    {
        string yaml = $"""
            model: '{Fixtures.TinyModel}'
            data: '{DataFile}'
            work_dir: '{WorkDir}'
            device: cpu
            mode: lora
            lora_r: 8
            lora_alpha: 16
            lora_dropout: 0.0
            max_dynamic_patch: 1
            max_length: 1024
            batch_size: 2
            accumulative_counts: 1
            lr: 0.002
            warmup_ratio: 0.0
            max_steps: 30
            log_interval: 10
            save_steps: 0
            save_total_limit: 2
            dataloader_num_workers: 2
            gradient_checkpointing: true
            seed: 7
            """;
        return TrainConfig.Parse(yaml, Path.Combine(Dir, "test.yaml"), overrides);
    }

    public void Dispose()
    {
        try { Directory.Delete(Dir, true); } catch (IOException) { }
    }
}
