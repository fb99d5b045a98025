using System.Globalization;
using System.Text.Json;
using VlmTune.Tests.Data;

namespace VlmTune.Tests.Training;

/// <summary>
/// Run folders as the trainer lays them out (work_dirs/&lt;name&gt;/&lt;timestamp&gt;/ with the log, vis_data/scalars.json and
/// config.yaml, iter_N/ checkpoints beside, eval/iter_N.json files), written directly so that report and dashboard
/// tests need no training.
/// </summary>
internal static class FakeRuns
{
    /// <summary>A plausible loss curve: falling from about 3.</summary>
    public static double Loss(long iter) => 3 * Math.Exp(-iter / 40.0) + 0.3;

    /// <param name="scale">Scales loss, grad norm and tokens/s, so that runs drawn together can be told apart.</param>
    public static string ScalarsLine(long iter, long total = 40, double? loss = null, double? gradNorm = 1.0, double scale = 1) => JsonSerializer.Serialize(new Dictionary<string, object?>
    {
        ["lr"] = 2e-4 * 0.5 * (1 + Math.Cos(Math.PI * iter / total)), ["data_time"] = 0.01, ["loss"] = loss ?? scale * Loss(iter), ["time"] = 0.25,
        ["iter"] = iter, ["memory"] = 512, ["step"] = iter, ["grad_norm"] = gradNorm is null ? null : scale * (gradNorm + 0.3 * Math.Sin(iter / 5.0)),
        ["tokens_per_s"] = scale * (2400 + 40 * Math.Sin(iter / 3.0)), ["optimizer_step"] = iter / 2,
    });

    public static string EvalLine(long iter, double evalLoss) => JsonSerializer.Serialize(new { eval_loss = evalLoss, iter, step = iter });

    public static string LogLine(long iter, long total, string eta) =>
        $"2026/12/01 10:{iter / 60 % 60:00}:{iter % 60:00} - vlmtune - INFO - Iter(train) [{iter.ToString(CultureInfo.InvariantCulture).PadLeft(total.ToString(CultureInfo.InvariantCulture).Length)}/{total}]  " +
        $"lr: 1.0000e-04  eta: {eta}  time: 0.2500  data_time: 0.0100  memory: 512  loss: {Loss(iter):F4}  grad_norm: 1.0000  tokens_per_s: 2400.0  mfu: -";

    /// <summary>
    /// Writes <c>root/work/stamp/</c>: scalars every <paramref name="every"/> iterations up to <paramref name="upTo"/> of
    /// <paramref name="total"/>, the log's iteration lines, config.yaml, and (finished) the closing line. Returns the run folder.
    /// </summary>
    public static string Write(string root, string work, string stamp, long upTo, long total = 40, int every = 4, bool finished = false,
        IEnumerable<(long Iter, double Loss)>? evals = null, double scale = 1)
    {
        string run = Path.Combine(root, work, stamp);
        Directory.CreateDirectory(Path.Combine(run, "vis_data"));
        var scalars = new List<string>();
        var log = new List<string> { $"2026/12/01 10:00:00 - vlmtune - INFO - vlmtune train: {work}.yaml (mode lora, device cpu, fp32); run folder {run}" };
        var evalByIter = (evals ?? []).ToDictionary(e => e.Iter, e => e.Loss);
        for (long i = every; i <= upTo; i += every)
        {
            scalars.Add(ScalarsLine(i, total, scale: scale));
            log.Add(LogLine(i, total, $"0:00:{(total - i) / 4:00}"));
            if (evalByIter.TryGetValue(i, out var l)) scalars.Add(EvalLine(i, l));
        }
        if (finished) log.Add($"2026/12/01 10:59:00 - vlmtune - INFO - training finished: {upTo} iterations, {upTo / 2} optimizer steps; skipped: none");
        File.WriteAllLines(Path.Combine(run, "vis_data", "scalars.json"), scalars);
        File.WriteAllLines(Path.Combine(run, stamp[..15] + ".log"), log);
        File.WriteAllText(Path.Combine(run, "vis_data", "config.yaml"), $"model: 'models/tiny'\ndata: ['data/{work}.jsonl']\nlr: 0.0002\nname: '{work}'\n");
        return run;
    }

    /// <summary>A complete checkpoint folder iter_N in the work dir (its trainer_state.json last, as the trainer writes it).</summary>
    public static string Checkpoint(string workDir, long iter, int bytes = 3000)
    {
        string dir = Path.Combine(workDir, $"iter_{iter}");
        Directory.CreateDirectory(dir);
        File.WriteAllBytes(Path.Combine(dir, "adapter_model.safetensors"), new byte[bytes]);
        File.WriteAllText(Path.Combine(dir, "trainer_state.json"), $$"""{"iteration": {{iter}}}""");
        return dir;
    }

    /// <summary>eval/iter_N.json with one answer per image (written under the run, images made as small JPEGs in <paramref name="imageDir"/>).</summary>
    public static string Eval(string runDir, long iter, double evalLoss, IReadOnlyList<string> images)
    {
        Directory.CreateDirectory(Path.Combine(runDir, "eval"));
        var answers = images.Select((image, i) => new
        {
            index = i, images = new[] { image }, question = $"<image>\nWhat is in picture {i}?", reference = $"A reference answer {i}.", answer = $"The model's answer {i} at {iter}.",
        });
        string path = Path.Combine(runDir, "eval", $"iter_{iter}.json");
        File.WriteAllText(path, JsonSerializer.Serialize(new { iter, eval_loss = evalLoss, answers }));
        return path;
    }

    public static string Image(string dir, string name, int width = 48, int height = 32)
    {
        Directory.CreateDirectory(dir);
        string path = Path.Combine(dir, name);
        File.WriteAllBytes(path, DataTestFiles.JpegBytes(width, height));
        return path;
    }
}
