using System.CommandLine;
using System.CommandLine.Help;

namespace VlmTune.Cli.Commands;

/// <summary>The <c>vlmtune</c> command tree, built in one place for Program and for the tests that walk it.</summary>
internal static class CliRoot
{
    public const string Name = "vlmtune";

    /// <summary>
    /// A plain <see cref="Command"/> named <c>vlmtune</c>, not a <see cref="RootCommand"/>: that one takes its name from
    /// the entry assembly (VlmTune.Cli), which help would then print as the command to type.
    /// </summary>
    /// <param name="switches">The VLMTUNE_* switches Program read at start-up (tests walking the tree: the defaults).</param>
    public static Command Create(RuntimeSwitches? switches = null) => Tree(switches ?? RuntimeSwitches.Defaults);

    private static Command Tree(RuntimeSwitches switches) => new(Name, "VlmTune: fine-tune and serve InternVL multimodal models from .NET.")
    {
        new HelpOption(),
        new VersionOption(),
        ChatCommand.Create(switches),
        ServeCommand.Create(switches),
        BenchCommand.Create(switches),
        DownloadCommand.Create(),
        DataCommand.Create(switches),
        MergeCommand.Create(switches),
        TrainCommand.Create(switches),
        PlotCommand.Create(),
        DashboardCommand.Create(),
        DistSelftestCommand.Create(),
    };
}
