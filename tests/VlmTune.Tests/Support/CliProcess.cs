using System.Diagnostics;
using System.Text;

namespace VlmTune.Tests.Support;

/// <summary>
/// Runs the real <c>vlmtune</c> CLI (VlmTune.Cli.dll, copied beside the tests) as a child process, capturing its output,
/// for tests of exit codes, messages and behaviour across processes (locks, kill -9).
/// </summary>
public sealed class CliProcess : IDisposable
{
    private readonly Process _process;
    private readonly StringBuilder _stdout = new();
    private readonly StringBuilder _stderr = new();

    /// <summary>Environment variables that would change the CLI's behaviour; the child never inherits them.</summary>
    private static readonly string[] Scrubbed =
        ["HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODELSCOPE_DOMAIN", "MODELSCOPE_API_TOKEN"];

    private CliProcess(Process process) => _process = process;

    /// <param name="defaultSigint">
    /// Start through python3 that resets SIGINT to its default first: a child of a background job inherits SIGINT
    /// ignored, and then no Ctrl-C handler of the CLI would ever run.
    /// </param>
    public static CliProcess Start(IEnumerable<string> args, IDictionary<string, string>? env = null, bool defaultSigint = false)
    {
        var dotnet = Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host && File.Exists(host) ? host : "dotnet";
        var info = new ProcessStartInfo(defaultSigint ? "python3" : dotnet)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        if (defaultSigint)
            foreach (var a in new[] { "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])", dotnet })
                info.ArgumentList.Add(a);
        info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "VlmTune.Cli.dll"));
        foreach (var a in args) info.ArgumentList.Add(a);
        foreach (var name in Scrubbed) info.Environment.Remove(name);
        if (env is not null) foreach (var (k, v) in env) info.Environment[k] = v;

        var process = new Process { StartInfo = info };
        var cli = new CliProcess(process);
        process.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (cli._stdout) cli._stdout.AppendLine(e.Data); };
        process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (cli._stderr) cli._stderr.AppendLine(e.Data); };
        process.Start();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return cli;
    }

    public static async Task<(int ExitCode, string Stdout, string Stderr)> RunAsync(
        IEnumerable<string> args, IDictionary<string, string>? env = null, int timeoutSeconds = 60)
    {
        using var cli = Start(args, env);
        var code = await cli.WaitAsync(timeoutSeconds);
        return (code, cli.Stdout, cli.Stderr);
    }

    public string Stdout { get { lock (_stdout) return _stdout.ToString(); } }
    public string Stderr { get { lock (_stderr) return _stderr.ToString(); } }

    public async Task<int> WaitAsync(int timeoutSeconds = 60)
    {
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(timeoutSeconds));
        try { await _process.WaitForExitAsync(timeout.Token); }
        catch (OperationCanceledException)
        {
            _process.Kill(entireProcessTree: true);
            throw new TimeoutException($"vlmtune did not exit within {timeoutSeconds} s.\nstdout:\n{Stdout}\nstderr:\n{Stderr}");
        }
        _process.WaitForExit(); // drains the redirected output
        return _process.ExitCode;
    }

    /// <summary>SIGKILL on Unix: no cleanup code of the CLI runs, as with <c>kill -9</c>.</summary>
    public void Kill()
    {
        _process.Kill(entireProcessTree: true);
        _process.WaitForExit();
    }

    /// <summary>Sends a POSIX signal (e.g. 15, SIGTERM) to the process.</summary>
    public void Signal(int signal)
    {
        if (kill(_process.Id, signal) != 0) throw new InvalidOperationException($"kill({_process.Id}, {signal}) failed");
    }

    [System.Runtime.InteropServices.DllImport("libc")]
    private static extern int kill(int pid, int signal);

    /// <summary>Waits until the output contains <paramref name="text"/> (true) or the process exits or time runs out (false).</summary>
    public async Task<bool> WaitForOutputAsync(string text, int timeoutSeconds = 30)
    {
        var deadline = DateTime.UtcNow.AddSeconds(timeoutSeconds);
        while (DateTime.UtcNow < deadline)
        {
            if (Stdout.Contains(text, StringComparison.Ordinal)) return true;
            if (_process.HasExited) return Stdout.Contains(text, StringComparison.Ordinal);
            await Task.Delay(20);
        }
        return false;
    }

    /// <summary>As <see cref="WaitForOutputAsync"/>, on stderr.</summary>
    public async Task<bool> WaitForStderrAsync(string text, int timeoutSeconds = 30)
    {
        var deadline = DateTime.UtcNow.AddSeconds(timeoutSeconds);
        while (DateTime.UtcNow < deadline)
        {
            if (Stderr.Contains(text, StringComparison.Ordinal)) return true;
            if (_process.HasExited) return Stderr.Contains(text, StringComparison.Ordinal);
            await Task.Delay(20);
        }
        return false;
    }

    public void Dispose()
    {
        if (!_process.HasExited) _process.Kill(entireProcessTree: true);
        _process.Dispose();
    }
}
