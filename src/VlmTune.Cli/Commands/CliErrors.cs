namespace VlmTune.Cli.Commands;

/// <summary>Runs a command body and turns user-facing failures into one clear line on stderr and exit code 1.</summary>
internal static class CliErrors
{
    public static async Task<int> RunAsync(Func<Task<int>> body)
    {
        try { return await body(); }
        catch (OperationCanceledException) { Console.Error.WriteLine("error: cancelled"); return 130; }
        catch (Exception e) when (e is VlmTune.VlmTuneException or IOException or UnauthorizedAccessException or ArgumentException or FormatException)
        {
            Console.Error.WriteLine($"error: {e.Message}");
            return 1;
        }
    }

    public static int Run(Func<int> body) => RunAsync(() => Task.FromResult(body())).GetAwaiter().GetResult();
}
