using System.CommandLine;
using System.Runtime.InteropServices;

namespace VlmTune.Cli.Commands;

/// <summary><c>vlmtune dashboard WORK_DIR [--port N] [--host ADDR]</c>: follow training runs live in the browser.</summary>
internal static class DashboardCommand
{
    private static readonly Argument<string> Dir = new("dir") { Description = "A work dir, a run folder, or a folder of work dirs: every run under it (three levels down) is shown, and new ones as they start." };
    private static readonly Option<int> Port = new("--port") { Description = "Port to listen on (0: any free port).", DefaultValueFactory = _ => 8766 };
    private static readonly Option<string> Host = new("--host") { Description = "Address to bind; the runs are only visible on this machine unless you pass another.", DefaultValueFactory = _ => "127.0.0.1" };

    public static Command Create()
    {
        var command = new Command("dashboard", "Follow training runs in the browser: curves, progress and ETA, evaluation answers with their images, checkpoints and config; several runs side by side.")
        {
            Dir, Port, Host,
        };
        command.SetAction((parse, ct) => CliErrors.RunAsync(async () =>
        {
            string dir = Path.GetFullPath(parse.GetValue(Dir)!);
            ListenErrors.ThrowIfUnavailable(parse.GetValue(Host)!, parse.GetValue(Port));
            await using var app = Serving.DashboardServer.Build(dir, parse.GetValue(Host)!, parse.GetValue(Port));
            using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
            void OnSignal(PosixSignalContext signal) { signal.Cancel = true; stop.Cancel(); }
            using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, OnSignal);
            using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, OnSignal);
            await ListenErrors.StartAsync(app, parse.GetValue(Host)!, parse.GetValue(Port));
            int runs = Training.Reports.RunFolders.Find(dir).Count;
            Console.WriteLine($"Dashboard of {dir} ({runs} run{(runs == 1 ? "" : "s")} now) on {Serving.VlmTuneServer.Address(app)}. Ctrl-C to stop.");
            try { await Task.Delay(Timeout.Infinite, stop.Token); }
            catch (OperationCanceledException) { }
            await app.StopAsync(CancellationToken.None);
            return 0;
        }));
        return command;
    }
}
