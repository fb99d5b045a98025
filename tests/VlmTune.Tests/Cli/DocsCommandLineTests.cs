using System.CommandLine;
using System.Text.RegularExpressions;
using VlmTune.Cli.Commands;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Cli;

/// <summary>
/// Every <c>vlmtune ...</c> command line of README.md, docs/*.md (code blocks and inline code) and the configs' comment
/// headers is parsed against the real command tree, without running it: an unknown command or option fails the test.
/// </summary>
[Collection(HelpTextTests.TreeCollection)]   // one shared tree, parsed by one test at a time
public class DocsCommandLineTests
{
    /// <summary>A command line as written in the docs, with the file and line it came from.</summary>
    internal sealed record DocCommand(string Where, string Text);

    // "vlmtune" where a shell runs it (line start after a prompt or VAR=value assignments, or a path), then a
    // subcommand or an option: "(the vlmtune tool: ...)" in a diagram or "- vlmtune - INFO" in a log is no command.
    private static readonly Regex Invocation = new(@"(?:^\s*(?:\$\s+)?(?:[A-Z_][A-Z0-9_]*=\S+\s+)*|/)vlmtune\s+((?:[a-z]|--)[^\n]*)");
    private static readonly Regex InlineInvocation = new(@"`vlmtune ((?:[a-z]|--)[^`]*)`");

    internal static IEnumerable<DocCommand> Extract(string relativePath, string[] lines)
    {
        bool markdown = relativePath.EndsWith(".md", StringComparison.Ordinal);
        bool fenced = false;
        for (int i = 0; i < lines.Length; i++)
        {
            var line = lines[i];
            var where = $"{relativePath}:{i + 1}";
            if (!markdown)
            {
                // YAML recipes: the commands of their comment header.
                if (Regex.Match(line, @"^\s*#(.*)$") is { Success: true } comment)
                    foreach (Match m in Invocation.Matches(comment.Groups[1].Value).Concat(InlineInvocation.Matches(comment.Groups[1].Value)))
                        yield return new(where, m.Groups[1].Value);
                continue;
            }
            if (line.TrimStart().StartsWith("```", StringComparison.Ordinal)) { fenced = !fenced; continue; }
            if (fenced)
            {
                while (line.EndsWith('\\') && i + 1 < lines.Length) line = line[..^1] + " " + lines[++i];
                foreach (Match m in Invocation.Matches(line)) yield return new(where, m.Groups[1].Value);
            }
            else
                foreach (Match m in InlineInvocation.Matches(line)) yield return new(where, m.Groups[1].Value);
        }
    }

    /// <summary>
    /// The tokens a shell would pass, from a docs line: comments and what follows a pipe or redirection dropped, and
    /// synopsis notation read as its first reading — <c>[--opt X]</c> as <c>--opt X</c>, <c>a|b</c> as <c>a</c>,
    /// <c>...</c> dropped.
    /// </summary>
    internal static string[] Tokens(string text)
    {
        text = text.Replace("\\|", "|");
        text = Regex.Replace(text, @"\s#.*$", "");
        text = Regex.Split(text, @"\s(?:\||&&|;|&|\d?>>?)\s?")[0];
        var tokens = new List<string>();
        foreach (Match m in Regex.Matches(text, "\"[^\"]*\"|'[^']*'|\\S+"))
        {
            var token = m.Value;
            if (token[0] is '"' or '\'') { tokens.Add(token[1..^1]); continue; }
            token = token.Trim('[', ']');
            if (token.EndsWith("...", StringComparison.Ordinal)) token = token[..^3];
            if (token.EndsWith('…')) token = token[..^1];
            token = token.TrimEnd(']');
            if (token.Contains('|')) token = token.Split('|')[0];
            if (token.Length > 0) tokens.Add(token);
        }
        return tokens.ToArray();
    }

    internal static IEnumerable<DocCommand> AllDocCommands()
    {
        var root = Fixtures.RepoRoot;
        var files = new[] { "README.md" }
            .Concat(Directory.GetFiles(Path.Combine(root, "docs"), "*.md").Select(f => Path.GetRelativePath(root, f)))
            .Concat(Directory.GetFiles(Path.Combine(root, "configs"), "*.yaml").Select(f => Path.GetRelativePath(root, f)))
            .Order(StringComparer.Ordinal);
        return files.SelectMany(f => Extract(f, File.ReadAllLines(Path.Combine(root, f))));
    }

    [Fact]
    public void EveryCommandLineInTheDocsParsesAgainstTheRealCommands()
    {
        var root = HelpTextTests.Tree;
        var commands = AllDocCommands().ToList();
        Assert.True(commands.Count > 40, $"only {commands.Count} vlmtune command lines found in the docs: is the extraction broken?");
        var problems = new List<string>();
        foreach (var command in commands)
        {
            var parse = root.Parse(Tokens(command.Text));
            if (parse.UnmatchedTokens.Count > 0)
                problems.Add($"{command.Where}: `vlmtune {command.Text}`: unknown {string.Join(", ", parse.UnmatchedTokens.Select(t => $"'{t}'"))} (vlmtune {string.Join(' ', CommandPath(parse.CommandResult.Command))} --help lists what it takes)");
        }
        Assert.True(problems.Count == 0, string.Join("\n", problems));
    }

    [Fact]
    public void EveryCommandIsShownInTheDocs()
    {
        var shown = AllDocCommands().Select(c => string.Join(' ', CommandPath(HelpTextTests.Tree.Parse(Tokens(c.Text)).CommandResult.Command))).ToHashSet();
        var missing = HelpTextTests.Commands(HelpTextTests.Tree, CliRoot.Name)
            .Where(c => c.Command.Subcommands.Count == 0)
            .Select(c => c.Path[(CliRoot.Name.Length + 1)..])
            .Where(path => !shown.Contains(path))
            .ToList();
        Assert.True(missing.Count == 0, "not in any command line of README.md, docs/ or configs/: " + string.Join(", ", missing.Select(m => $"vlmtune {m}")));
    }

    [Fact]
    public void TheExtractionReadsSynopsesAsAShellWould()
    {
        Assert.Equal(["data", "browse", "FILE", "--port", "8765"], Tokens("data browse FILE|META [--port 8765]"));
        Assert.Equal(["chat", "--device", "cpu", "--image", "PATH"], Tokens(@"chat --device cpu\|cuda [--image PATH]... # comment"));
        Assert.Equal(["train", "c.yaml", "--set", "a b"], Tokens("train c.yaml --set \"a b\" 2>&1 | tee log"));
        var found = Extract("docs/x.md", ["```bash", "NPROC=2 out/vlmtune train c.yaml \\", "  --zero 1", "(the vlmtune tool: one file)", "```", "run `vlmtune data oogiri` or vlmtune - INFO"]).ToList();
        Assert.Equal([new DocCommand("docs/x.md:2", "train c.yaml    --zero 1"), new DocCommand("docs/x.md:6", "data oogiri")], found);
        Assert.Equal(["oogiri"], HelpTextTests.Tree.Parse(Tokens("data oogiri")).UnmatchedTokens);
    }

    private static IEnumerable<string> CommandPath(Command command)
    {
        var names = new List<string>();
        for (Symbol? s = command; s is Command c && c.Name != CliRoot.Name; s = c.Parents.FirstOrDefault()) names.Insert(0, c.Name);
        return names;
    }
}
