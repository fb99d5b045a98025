namespace VlmTune.Diagnostics;

/// <summary>
/// Test aid for stop signals and kills mid-work, without timing: <c>VLMTUNE_TEST_PAUSE=POINT</c> makes the process
/// print <c>VLMTUNE_TEST_PAUSE: POINT</c> on stdout the first time it reaches that point, then wait there until it is
/// asked to stop (the token), so a test can send SIGTERM or SIGKILL while temporaries exist.
/// </summary>
public static class TestPause
{
    private static readonly string? Point = Environment.GetEnvironmentVariable("VLMTUNE_TEST_PAUSE");
    private static int _paused;

    public static void At(string point, CancellationToken stop)
    {
        if (Point != point || Interlocked.Exchange(ref _paused, 1) == 1) return;
        Console.WriteLine($"VLMTUNE_TEST_PAUSE: {point}");
        Console.Out.Flush();
        stop.WaitHandle.WaitOne();
    }
}
