using System.CommandLine;
using VlmTune;
using VlmTune.Cli.Commands;

// Program only wires: each command lives in Commands/ with its options and behaviour. The VLMTUNE_* switches are read
// here, once, and handed to the commands that pass them on (docs/runtime-switches.md).
RuntimeSwitches switches;
try { switches = RuntimeSwitches.FromEnvironment(); }
catch (VlmTuneException e)
{
    Console.Error.WriteLine($"error: {e.Message}");
    return 1;
}
return await CliRoot.Create(switches).Parse(args).InvokeAsync();
