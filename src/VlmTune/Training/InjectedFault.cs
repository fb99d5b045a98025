namespace VlmTune.Training;

/// <summary>
/// Test aid for the failure handling of data-parallel jobs: VLMTUNE_TEST_FAULT=exit|hang:RANK:ITERATION makes that rank
/// die (exit code 7, no cleanup, as a crash would) or stop responding when it reaches that iteration.
/// </summary>
internal static class InjectedFault
{
    private static readonly (string Kind, int Rank, long Iteration)? Fault = Parse(Environment.GetEnvironmentVariable("VLMTUNE_TEST_FAULT"));

    private static (string, int, long)? Parse(string? raw)
    {
        var parts = raw?.Split(':');
        return parts is [var kind and ("exit" or "hang"), var r, var i] && int.TryParse(r, out var rank) && long.TryParse(i, out var it)
            ? (kind, rank, it) : null;
    }

    public static void At(int rank, long iteration)
    {
        if (Fault is not { } f || f.Rank != rank || f.Iteration != iteration) return;
        Console.Error.WriteLine($"VLMTUNE_TEST_FAULT: rank {rank} {(f.Kind == "exit" ? "dies" : "hangs")} at iteration {iteration}");
        Console.Error.Flush();
        if (f.Kind == "exit") VlmTune.Diagnostics.ProcessExit.Now(7);
        Thread.Sleep(Timeout.Infinite);
    }
}
