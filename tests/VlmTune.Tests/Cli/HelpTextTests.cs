using VlmTune.Models;
using System.CommandLine;
using System.CommandLine.Help;
using System.Text.RegularExpressions;
using VlmTune.Cli.Commands;

namespace VlmTune.Tests.Cli;

/// <summary>
/// The help of every command of the real tree, walked in-process: every option and argument described, defaults in one
/// style, the tool's own name in the usage lines, and --dtype listing exactly the names it accepts.
/// </summary>
[Collection(HelpTextTests.TreeCollection)]   // one shared tree, parsed by one test at a time
public class HelpTextTests
{
    /// <summary>
    /// One tree for all tests: the commands share static option instances, and building trees on parallel test threads
    /// would add each to several parents at once.
    /// </summary>
    internal static readonly Command Tree = CliRoot.Create();

    internal const string TreeCollection = "vlmtune command tree";

    /// <summary>Every command of the tree with its path from the root ("vlmtune", "vlmtune data browse", ...).</summary>
    internal static IEnumerable<(string Path, Command Command)> Commands(Command command, string path)
    {
        yield return (path, command);
        foreach (var sub in command.Subcommands)
            foreach (var found in Commands(sub, $"{path} {sub.Name}")) yield return found;
    }

    private static readonly Regex HandWrittenDefault = new(@" \[default: [^\[\]]+\]$");

    /// <summary>
    /// The one style: a description is sentences ending with a period; a default System.CommandLine cannot show (a
    /// computed one) is written as it writes its own, " [default: ...]" at the end; nothing else says "default".
    /// </summary>
    internal static IEnumerable<string> StyleProblems(string where, string? description, bool hasDefaultValue)
    {
        if (string.IsNullOrWhiteSpace(description)) { yield return $"{where}: no description"; yield break; }
        var handWritten = HandWrittenDefault.Match(description);
        var text = handWritten.Success ? description[..handWritten.Index] : description;
        if (handWritten.Success && hasDefaultValue)
            yield return $"{where}: writes its default by hand although help prints it from DefaultValueFactory: \"{description}\"";
        if (Regex.IsMatch(text, @"\bdefault", RegexOptions.IgnoreCase))
            yield return $"{where}: mentions a default outside a trailing \" [default: ...]\": \"{description}\"";
        if (!text.TrimEnd().EndsWith('.'))
            yield return $"{where}: description does not end with a period: \"{description}\"";
    }

    [Fact]
    public void EveryOptionAndArgumentIsDescribedWithItsDefaultInOneStyle()
    {
        var problems = new List<string>();
        foreach (var (path, command) in Commands(Tree, CliRoot.Name))
        {
            if (string.IsNullOrWhiteSpace(command.Description)) problems.Add($"{path}: command has no description");
            foreach (var option in command.Options.Where(o => o is not HelpOption and not VersionOption))
                problems.AddRange(StyleProblems($"{path} {option.Name}", option.Description, option.HasDefaultValue));
            foreach (var argument in command.Arguments)
                problems.AddRange(StyleProblems($"{path} <{argument.Name}>", argument.Description, argument.HasDefaultValue));
        }
        Assert.True(problems.Count == 0, string.Join("\n", problems));
    }

    [Fact]
    public void TheStyleCheckCatchesEachKindOfDrift()
    {
        Assert.Single(StyleProblems("x", null, false));
        Assert.Single(StyleProblems("x", "Port (default 23333).", false));
        Assert.Single(StyleProblems("x", "Most tokens. [default: 512]", true));
        Assert.Single(StyleProblems("x", "Most tokens", false));
        Assert.Empty(StyleProblems("x", "Most tiles per image. [default: the model's max_dynamic_patch]", false));
    }

    [Fact]
    public void EveryCommandPrintsItsHelpUnderTheToolsName()
    {
        var root = Tree;
        var empty = new List<string>();
        foreach (var (path, _) in Commands(root, CliRoot.Name))
        {
            var output = new StringWriter();
            var args = path.Split(' ')[1..].Append("--help").ToArray();
            int code = root.Parse(args).Invoke(new InvocationConfiguration { Output = output, Error = output });
            Assert.Equal(0, code);
            // Hidden commands print nothing for --help; each command's usage names the tool as a user types it.
            if (!output.ToString().Contains($"Usage:\n  {path}", StringComparison.Ordinal)) empty.Add($"{path}: {output}");
        }
        Assert.True(empty.Count == 0, string.Join("\n", empty));
    }

    [Fact]
    public void EveryDTypeOptionListsExactlyTheNamesItAccepts()
    {
        var dtypeOptions = Commands(Tree, CliRoot.Name)
            .SelectMany(c => c.Command.Options.Where(o => o.Name == "--dtype").Select(o => (c.Path, o.Description!)))
            .ToList();
        Assert.Equal(5, dtypeOptions.Count);   // chat, serve, merge, bench decode, bench train
        foreach (var (path, description) in dtypeOptions)
        {
            var listed = Regex.Matches(description, @"\b(?:float|bfloat|fp|bf)\d+\b").Select(m => m.Value).Distinct().ToList();
            var accepted = TensorPlacement.AcceptedDTypeNames.ToList();
            Assert.True(accepted.Order().SequenceEqual(listed.Order()), $"{path} --dtype lists [{string.Join(", ", listed)}], accepts [{string.Join(", ", accepted)}]");
            foreach (var name in listed) Assert.NotNull(TensorPlacement.ParseDType(name));
        }
        var error = Assert.Throws<VlmTuneException>(() => TensorPlacement.ParseDType("int8"));
        Assert.Equal("--dtype 'int8' is not supported (float32, bfloat16, float16).", error.Message);
    }
}
