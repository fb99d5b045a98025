namespace VlmTune.Diagnostics;

/// <summary>
/// Test aid for stop signals and kills mid-work, without timing: with <c>VLMTUNE_TEST_PAUSE=POINT</c> (passed in as
/// <see cref="RuntimeSwitches.TestPause"/>) the process prints <c>VLMTUNE_TEST_PAUSE: POINT</c> on stdout the first time
/// it reaches that point, then waits there until it is asked to stop (the token), so a test can send SIGTERM or SIGKILL
/// while temporaries exist.
/// </summary>
public static class TestPause
{
    /// <summary>The points the code pauses at; a switch naming another is refused, as it would never pause.</summary>
    public static readonly IReadOnlyList<string> Points = ["checkpoint", "merge-shard", "convert-record"];

    private static int _paused;

    /// <summary>Pauses if <paramref name="pauseAt"/> (the switch) is <paramref name="point"/>, once per process.</summary>
    public static void At(string? pauseAt, string point, CancellationToken stop)
    {
        if (pauseAt != point || Interlocked.Exchange(ref _paused, 1) == 1) return;
        Console.WriteLine($"{RuntimeSwitches.TestPauseVariable}: {point}");
        Console.Out.Flush();
        stop.WaitHandle.WaitOne();
    }
}
