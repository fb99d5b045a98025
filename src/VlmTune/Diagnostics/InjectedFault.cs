using System.Globalization;

namespace VlmTune.Diagnostics;

public enum InjectedFaultKind { Exit, Hang }

/// <summary>
/// Test aid for the failure handling of data-parallel jobs (VLMTUNE_TEST_FAULT=exit|hang:RANK:ITERATION): that rank
/// dies (exit code 7, no cleanup, as a crash would) or stops responding when it reaches that iteration.
/// </summary>
public sealed record InjectedFault(InjectedFaultKind Kind, int Rank, long Iteration)
{
    /// <summary>exit:RANK:ITERATION or hang:RANK:ITERATION; null for anything else.</summary>
    public static InjectedFault? Parse(string raw)
    {
        var parts = raw.Trim().Split(':');
        if (parts is not [var kind, var r, var i]
            || !int.TryParse(r, NumberStyles.None, CultureInfo.InvariantCulture, out var rank)
            || !long.TryParse(i, NumberStyles.None, CultureInfo.InvariantCulture, out var iteration)) return null;
        return kind switch
        {
            "exit" => new(InjectedFaultKind.Exit, rank, iteration),
            "hang" => new(InjectedFaultKind.Hang, rank, iteration),
            _ => null,
        };
    }

    /// <summary>Dies or hangs if this is the rank and the iteration; otherwise returns at once.</summary>
    public void At(int rank, long iteration)
    {
        if (rank != Rank || iteration != Iteration) return;
        Console.Error.WriteLine($"{RuntimeSwitches.TestFaultVariable}: rank {rank} {(Kind == InjectedFaultKind.Exit ? "dies" : "hangs")} at iteration {iteration}");
        Console.Error.Flush();
        if (Kind == InjectedFaultKind.Exit) ProcessExit.Now(7);
        Thread.Sleep(Timeout.Infinite);
    }
}
