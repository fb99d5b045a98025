using System.CommandLine;
using VlmTune.Cli.Commands;

// Program only wires: each command lives in Commands/ with its options and behaviour.
var root = new RootCommand("VlmTune: fine-tune and serve InternVL2 multimodal models from .NET.")
{
    ChatCommand.Create(),
    ServeCommand.Create(),
    BenchCommand.Create(),
    DownloadCommand.Create(),
    DataCommand.Create(),
    MergeCommand.Create(),
    TrainCommand.Create(),
    PlotCommand.Create(),
    DashboardCommand.Create(),
    DistSelftestCommand.Create(),
};
return await root.Parse(args).InvokeAsync();
