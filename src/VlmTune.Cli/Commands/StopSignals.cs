using System.Runtime.InteropServices;

namespace VlmTune.Cli.Commands;

/// <summary>
/// SIGINT (Ctrl-C) and SIGTERM (systemd, Docker, Kubernetes) for the long-running commands: the first one cancels
/// <see cref="Token"/>, the command stops at its next safe point, removes its temporaries, publishes nothing partial
/// and exits with <see cref="ExitCode"/>; a second one ends the process at once with the same code (whatever it
/// leaves, the next run removes). Commands using it have synchronous actions, so System.CommandLine installs no
/// handler of its own that could end the process before the cleanup.
/// </summary>
internal sealed class StopSignals : IDisposable
{
    /// <summary>Exit code of a command stopped by a signal (128 + SIGINT, as shells report Ctrl-C), for both signals.</summary>
    public const int ExitCode = 130;

    private readonly CancellationTokenSource _stop = new();
    private readonly PosixSignalRegistration[] _registrations;
    private readonly string _stopping;
    private int _received;

    private StopSignals(string stopping)
    {
        _stopping = stopping;
        _registrations = [PosixSignalRegistration.Create(PosixSignal.SIGINT, OnSignal), PosixSignalRegistration.Create(PosixSignal.SIGTERM, OnSignal)];
    }

    /// <param name="stopping">What the command does on the first signal, e.g. "finishing the current tensor, removing the temporary folder".</param>
    public static StopSignals Listen(string stopping) => new(stopping);

    public CancellationToken Token => _stop.Token;

    /// <summary>The first signal received (SIGINT or SIGTERM), or null.</summary>
    public string? Signal { get; private set; }

    public bool Requested => Signal is not null;

    private void OnSignal(PosixSignalContext context)
    {
        context.Cancel = true;
        string name = context.Signal == PosixSignal.SIGINT ? "SIGINT" : "SIGTERM";
        if (Interlocked.Increment(ref _received) > 1)
        {
            Console.Error.WriteLine($"{name} again: quitting now (the next run removes what is left)");
            Diagnostics.ProcessExit.Now(ExitCode);
        }
        Signal = name;
        Console.Error.WriteLine($"{name}: stopping: {_stopping} (signal again to quit now)");
        _stop.Cancel();
    }

    /// <summary>
    /// Runs <paramref name="body"/>; a cancellation it ends with because of a signal becomes <paramref name="stopped"/>
    /// on stderr and <see cref="ExitCode"/>.
    /// </summary>
    public int Run(Func<CancellationToken, int> body, string stopped)
    {
        try { return body(Token); }
        catch (OperationCanceledException) when (Requested)
        {
            Console.Error.WriteLine($"stopped by {Signal}: {stopped}");
            return ExitCode;
        }
    }

    public void Dispose()
    {
        foreach (var r in _registrations) r.Dispose();
        _stop.Dispose();
    }
}
