using System.Diagnostics;
using SkiaSharp;
using VlmTune.Data;

namespace VlmTune.Bench;

/// <summary>
/// Converts a generated CLoT-like Oogiri-GO dataset (default 40,000 lines, one distinct JPEG per line, with a few lines
/// of each skip reason) and reports wall time and peak working set of the conversion, then of loading and validating
/// the result (and with --validate, validating it: every image decoded). The dataset is generated before measuring and kept in --dir for reruns.
/// </summary>
internal static class OogiriBench
{
    public static int Run(string[] args)
    {
        var lines = 40_000;
        var dir = Path.Combine(Path.GetTempPath(), "vlmtune-bench-oogiri");
        var validate = args.Contains("--validate");
        for (var i = 0; i + 1 < args.Length; i++)
        {
            if (args[i] == "--lines") lines = int.Parse(args[i + 1]);
            else if (args[i] == "--dir") dir = args[i + 1];
        }
        var input = Path.Combine(dir, $"cn-{lines}.jsonl");
        if (!File.Exists(input)) Generate(dir, input, lines);

        var output = Path.Combine(dir, "ex_cn.json");
        var before = PeakWorkingSetMiB();
        var clock = Stopwatch.StartNew();
        var result = OogiriConverter.Convert(input, output);
        clock.Stop();
        Console.WriteLine($"convert-oogiri: {result.Read} lines read, {result.Kept} kept, {result.Skipped.Count} skipped " +
                          $"in {clock.Elapsed.TotalSeconds:F2} s; peak working set {PeakWorkingSetMiB():F0} MiB (before: {before:F0} MiB); " +
                          $"output {new FileInfo(output).Length / 1048576.0:F1} MiB");

        clock.Restart();
        var samples = TrainingData.Read(output).Count();
        clock.Stop();
        Console.WriteLine($"load (JSON array, streaming): {samples} samples in {clock.Elapsed.TotalSeconds:F2} s; peak working set {PeakWorkingSetMiB():F0} MiB");

        if (!validate) return 0;
        clock.Restart();
        var report = DataValidator.Validate(TrainingData.ReadEntries(output), new ValidationOptions());
        clock.Stop();
        Console.WriteLine($"validate (decode every image, no tokenizer): {report.Samples} samples, {report.ErrorCount} errors in " +
                          $"{clock.Elapsed.TotalSeconds:F2} s; peak working set {PeakWorkingSetMiB():F0} MiB " +
                          $"(managed heap after a full GC: {GC.GetTotalMemory(forceFullCollection: true) / 1048576.0:F0} MiB, report still alive: {report.Records})");
        return 0;
    }

    private static double PeakWorkingSetMiB()
    {
        using var self = Process.GetCurrentProcess();
        self.Refresh();
        return self.PeakWorkingSet64 / 1048576.0;
    }

    /// <summary>Writes the jsonl and its images: 1 line in 50 is T2T, 1 in 400 misses its image, 1 in 500 has empty text, 1 in 2000 is malformed.</summary>
    private static void Generate(string dir, string input, int lines)
    {
        Console.WriteLine($"generating {lines} lines and images in {dir} ...");
        var images = Path.Combine(dir, "images");
        Directory.CreateDirectory(images);
        var jpegs = new[] { (450, 444), (640, 480), (300, 800), (1024, 512), (200, 200) }.Select(s => Jpeg(s.Item1, s.Item2)).ToArray();
        using var writer = new StreamWriter(input + ".tmp");
        var random = new Random(0);
        for (var i = 0; i < lines; i++)
        {
            var id = (1_000_000 + i).ToString();
            if (i % 2000 == 1000) { writer.WriteLine("{\"type\": \"I2T\", \"question\": null, \"image\": "); continue; }
            var type = i % 50 == 49 ? "T2T" : "I2T";
            if (i % 400 != 123) File.WriteAllBytes(Path.Combine(images, id + ".jpg"), jpegs[random.Next(jpegs.Length)]);
            var text = i % 500 == 234 ? "" : $"第{i}个梗：当你以为周末可以休息的时候，老板发来了消息 😂 \\\"Are you free?\\\"";
            var question = i % 3 == 0 ? "null" : "\"\"";
            writer.WriteLine($"{{\"type\": \"{type}\", \"question\": {question}, \"image\": \"{id}\", \"text\": \"{text}\", \"star\": {i % 6}}}");
        }
        writer.Close();
        File.Move(input + ".tmp", input, overwrite: true);
    }

    private static byte[] Jpeg(int width, int height)
    {
        using var bitmap = new SKBitmap(width, height);
        using (var canvas = new SKCanvas(bitmap))
        {
            canvas.Clear(SKColors.Beige);
            using var paint = new SKPaint { Color = SKColors.DarkRed };
            canvas.DrawCircle(width / 2f, height / 2f, Math.Min(width, height) / 3f, paint);
        }
        using var image = SKImage.FromBitmap(bitmap);
        using var data = image.Encode(SKEncodedImageFormat.Jpeg, 85);
        return data.ToArray();
    }
}
