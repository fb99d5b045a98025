using System.Text.Json;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Cli;

/// <summary>
/// The README's demo as a user runs it, through the real CLI: <c>train configs/tiny_lora_cpu.yaml</c> (only its paths
/// made absolute and its outputs sent to a temporary folder), <c>merge</c>, then <c>chat</c> on training prompts
/// answers with the training answers. The base model does not, so the answers are what the recipe taught.
/// </summary>
public sealed class QuickStartTests
{
    private static string Root(string relative) => Path.GetFullPath(Path.Combine(Fixtures.RepoRoot, relative));

    /// <summary>(prompt, image or null, answer) of a sample of the recipe's data.</summary>
    private static (string Prompt, string? Image, string Answer) Sample(string id)
    {
        foreach (var line in File.ReadLines(Root("configs/data/tiny_sft.jsonl")))
        {
            using var record = JsonDocument.Parse(line);
            var r = record.RootElement;
            if (r.GetProperty("id").GetString() != id) continue;
            var turns = r.GetProperty("conversations");
            string prompt = turns[0].GetProperty("value").GetString()!.Replace("<image>\n", "");
            string? image = r.TryGetProperty("image", out var i) ? Path.Combine(Fixtures.TinyDir, "images", i.GetString()!) : null;
            return (prompt, image, turns[1].GetProperty("value").GetString()!);
        }
        throw new InvalidOperationException($"no sample {id} in tiny_sft.jsonl");
    }

    private static async Task<string> Answer(string model, (string Prompt, string? Image, string Answer) sample)
    {
        List<string> args = ["chat", "--model", model, "--prompt", sample.Prompt, "--max-new-tokens", "48", "--json"];
        if (sample.Image is not null) args.AddRange(["--image", sample.Image]);
        var (code, stdout, stderr) = await CliProcess.RunAsync(args, timeoutSeconds: 120);
        Assert.True(code == 0, stderr);
        using var reply = JsonDocument.Parse(stdout);
        return reply.RootElement.GetProperty("text").GetString()!;
    }

    [FixtureFact]
    public async Task TheTinyRecipeTeachesTheTrainingAnswers()
    {
        var work = Directory.CreateTempSubdirectory("vlmtune-quickstart-");
        try
        {
            var shipped = VlmTune.Training.TrainConfig.Load(Root("configs/tiny_lora_cpu.yaml"));
            var (code, stdout, stderr) = await CliProcess.RunAsync(["train", Root("configs/tiny_lora_cpu.yaml"),
                "--set", $"model={Root(shipped.Model)}", "--set", $"data={Root(shipped.Data.Single())}",
                "--set", $"image_root={Root(shipped.ImageRoot!)}", "--set", $"work_dir={Path.Combine(work.FullName, "run")}"], timeoutSeconds: 600);
            Assert.True(code == 0, $"{stdout}\n{stderr}");
            string merged = Path.Combine(work.FullName, "merged");
            (code, stdout, stderr) = await CliProcess.RunAsync(["merge", "--base", Root(shipped.Model),
                "--adapter", Path.Combine(work.FullName, "run"), "--out", merged], timeoutSeconds: 300);
            Assert.True(code == 0, $"{stdout}\n{stderr}");

            // The README's prompt with its image, and a text-only one.
            foreach (var id in new[] { "tiny-0", "tiny-3" })
            {
                var sample = Sample(id);
                Assert.NotEqual(sample.Answer, await Answer(Root(shipped.Model), sample));
                Assert.Equal(sample.Answer, await Answer(merged, sample));
            }
        }
        finally { work.Delete(recursive: true); }
    }
}
