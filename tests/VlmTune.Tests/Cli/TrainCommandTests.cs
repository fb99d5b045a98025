using System.Diagnostics;
using VlmTune.Checkpoints;
using VlmTune.Tests.Support;
using VlmTune.Tests.Training;
using VlmTune.Training;

namespace VlmTune.Tests.Cli;

public sealed class TrainCommandTests
{
    [Fact]
    public async Task ConfigProblemsAreAllListedAndNothingStarts()
    {
        string dir = Path.Combine(Path.GetTempPath(), "vlmtune-traincli-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            string config = Path.Combine(dir, "bad.yaml");
            File.WriteAllText(config, "model: m\ndata: d.jsonl\nbatch_sise: 2\nlr: fast\n");
            var r = await CliProcess.RunAsync(["train", config, "--set", "mode=half", "--set", $"work_dir={dir}/w"]);
            Assert.Equal(1, r.ExitCode);
            Assert.Contains("error:", r.Stderr);
            Assert.Contains("'batch_sise': unknown key (did you mean 'batch_size'?)", r.Stderr);
            Assert.Contains("'lr': expected a number", r.Stderr);
            Assert.Contains("--set mode: expected one of full, lora, qlora", r.Stderr);
            Assert.False(Directory.Exists(Path.Combine(dir, "w")));
        }
        finally { Directory.Delete(dir, true); }
    }

    [FixtureFact]
    public void PipedRunPrintsPlainLogLinesAndCtrlCSavesACheckpoint()
    {
        using var data = new TrainTestData(samples: 6);
        string config = Path.Combine(data.Dir, "run.yaml");
        File.WriteAllText(config, data.Config("max_steps=400", "log_interval=1", "accumulative_counts=1", "save_steps=0").ToYaml());

        // Started through python3 to reset SIGINT to its default: a child of a background job inherits it ignored.
        var psi = new ProcessStartInfo("python3") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add("-c");
        psi.ArgumentList.Add("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])");
        psi.ArgumentList.Add("dotnet");
        psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "VlmTune.Cli.dll"));
        foreach (var a in new[] { "train", config }) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var stderr = p.StandardError.ReadToEndAsync();
        var lines = new List<string>();
        string? line;
        while ((line = p.StandardOutput.ReadLine()) is not null)
        {
            lines.Add(line);
            if (line.Contains("Iter(train) [  3/400]")) break;
        }
        Assert.Contains(lines, l => l.Contains("Iter(train) [  3/400]"));
        Process.Start("kill", ["-INT", p.Id.ToString()])!.WaitForExit();   // Ctrl-C
        string rest = p.StandardOutput.ReadToEnd();
        Assert.True(p.WaitForExit(TimeSpan.FromMinutes(2)));
        Assert.True(p.ExitCode == 130, $"exit code {p.ExitCode}: {stderr.Result}");
        Assert.Contains("stopping", stderr.Result);
        Assert.DoesNotContain('\u001b', string.Join("\n", lines) + rest);    // no progress bar or colours when piped
        Assert.Contains("interrupted", rest);
        var checkpoint = IterCheckpoint.Latest(data.WorkDir);
        Assert.NotNull(checkpoint);
        Assert.True(File.Exists(Path.Combine(checkpoint, "adapter_model.safetensors")));
        Assert.Contains("--resume auto", rest);
    }
}
