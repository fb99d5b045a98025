using System.Text.RegularExpressions;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;
using Microsoft.CodeAnalysis.CSharp.Syntax;

namespace VlmTune.Tests.Architecture;

/// <summary>A file of folder <see cref="From"/> naming the namespace of folder <see cref="To"/> at <see cref="File"/>:<see cref="Line"/>.</summary>
public sealed record FolderReference(string From, string To, string File, int Line, string Code)
{
    public override string ToString() => $"{File}:{Line} `{Code}`";
}

/// <summary>
/// Which folder of src/VlmTune names which other folder's namespace (<c>VlmTune.&lt;Folder&gt;</c>), read from the source
/// with Roslyn's parser (no compilation): using directives (static and alias ones too), fully-qualified names
/// (<c>VlmTune.Cuda.CudaDriver</c>, <c>global::VlmTune.X</c>), and names qualified from inside the VlmTune namespace
/// (<c>IO.OwnedTemporary</c>), counted when the second part is a type that folder declares, so a property called
/// <c>Vision</c> is not taken for the folder. Comments, doc crefs and strings are not code and do not count.
/// </summary>
public static class FolderReferences
{
    /// <summary>Build outputs, not source.</summary>
    private static readonly string[] NotSource = ["bin", "obj"];

    private static readonly CSharpParseOptions Parse = CSharpParseOptions.Default.WithLanguageVersion(LanguageVersion.Preview);

    /// <summary>The folders directly under <paramref name="sourceRoot"/>, in ordinal order.</summary>
    public static IReadOnlyList<string> Folders(string sourceRoot) =>
        Directory.GetDirectories(sourceRoot).Select(d => Path.GetFileName(d)!).Where(n => !NotSource.Contains(n)).Order(StringComparer.Ordinal).ToList();

    /// <summary>Every file of every folder under <paramref name="sourceRoot"/> (paths relative to it, '/'-separated).</summary>
    public static IReadOnlyList<SourceFile> Files(string sourceRoot) =>
        Folders(sourceRoot).SelectMany(folder => Directory.EnumerateFiles(Path.Combine(sourceRoot, folder), "*.cs", SearchOption.AllDirectories)
            .Order(StringComparer.Ordinal)
            .Select(path => new SourceFile(folder, Path.GetRelativePath(sourceRoot, path).Replace('\\', '/'), File.ReadAllText(path)))).ToList();

    /// <summary>The references between different folders in <paramref name="files"/>, in file and line order.</summary>
    public static IReadOnlyList<FolderReference> Read(IReadOnlyList<SourceFile> files)
    {
        var trees = files.Select(f => (File: f, Tree: CSharpSyntaxTree.ParseText(f.Text, Parse, f.Path))).ToList();
        var unreadable = trees.SelectMany(t => t.Tree.GetDiagnostics().Where(d => d.Severity == DiagnosticSeverity.Error)
            .Select(d => $"{t.File.Path}:{d.Location.GetLineSpan().StartLinePosition.Line + 1}: {d.GetMessage()}")).ToList();
        if (unreadable.Count > 0)
            throw new InvalidOperationException("Roslyn cannot parse the source (a newer C# feature? raise Microsoft.CodeAnalysis.CSharp):\n  " + string.Join("\n  ", unreadable));

        var types = new Dictionary<string, HashSet<string>>(StringComparer.Ordinal);   // folder namespace part → its top-level type names
        foreach (var (_, tree) in trees)
            foreach (var type in tree.GetRoot().DescendantNodes().OfType<MemberDeclarationSyntax>().Where(m => m is BaseTypeDeclarationSyntax or DelegateDeclarationSyntax))
            {
                if (type.Parent is not BaseNamespaceDeclarationSyntax ns || FolderOf(ns.Name.ToString()) is not { } folder) continue;
                if (!types.TryGetValue(folder, out var declared)) types[folder] = declared = new HashSet<string>(StringComparer.Ordinal);
                declared.Add(TypeName(type));
            }

        var folders = files.Select(f => f.Folder).ToHashSet(StringComparer.Ordinal);
        var found = new List<FolderReference>();
        foreach (var (file, tree) in trees)
        {
            var lines = tree.GetText().Lines;
            void Add(SyntaxNode node, string? to)
            {
                if (to is null || to == file.Folder || !folders.Contains(to)) return;
                int line = tree.GetLineSpan(node.Span).StartLinePosition.Line;
                found.Add(new FolderReference(file.Folder, to, file.Path, line + 1, lines[line].ToString().Trim()));
            }
            var root = tree.GetRoot();
            foreach (var u in root.DescendantNodes().OfType<UsingDirectiveSyntax>())
                Add(u, FolderOf(u.NamespaceOrType.ToString()));
            foreach (var id in root.DescendantNodes().OfType<IdentifierNameSyntax>())
            {
                if (id.Ancestors().OfType<UsingDirectiveSyntax>().Any() || Qualified(id) is not { } next) continue;
                string first = id.Identifier.ValueText;
                if (first == "VlmTune") Add(id, next);
                else if (types.TryGetValue(first, out var declared) && declared.Contains(next)) Add(id, first);
            }
        }
        return found;
    }

    /// <summary>The folder part of a <c>VlmTune.&lt;Folder&gt;[.…]</c> name; null for other names.</summary>
    private static string? FolderOf(string name)
    {
        var parts = name.Replace("global::", "", StringComparison.Ordinal).Split('.');
        return parts.Length >= 2 && parts[0] == "VlmTune" ? parts[1] : null;
    }

    /// <summary>
    /// For the first identifier of a dotted name (<c>A</c> in <c>A.B…</c>, or in <c>global::A.B</c>), the identifier after
    /// it; null when <paramref name="id"/> is not first or nothing follows it.
    /// </summary>
    private static string? Qualified(IdentifierNameSyntax id)
    {
        SyntaxNode self = id.Parent is AliasQualifiedNameSyntax alias && alias.Name == id ? alias : id;
        return self.Parent switch
        {
            QualifiedNameSyntax q when q.Left == self => q.Right.Identifier.ValueText,
            MemberAccessExpressionSyntax m when m.Expression == self && m.IsKind(SyntaxKind.SimpleMemberAccessExpression) => m.Name.Identifier.ValueText,
            _ => null,
        };
    }

    private static string TypeName(MemberDeclarationSyntax type) => type switch
    {
        BaseTypeDeclarationSyntax t => t.Identifier.ValueText,
        DelegateDeclarationSyntax d => d.Identifier.ValueText,
        _ => throw new ArgumentException(type.Kind().ToString()),
    };

    /// <summary>The namespaces a file declares that are not its folder's (<c>VlmTune.&lt;Folder&gt;</c> or below it).</summary>
    public static IEnumerable<string> ForeignNamespaces(SourceFile file) =>
        CSharpSyntaxTree.ParseText(file.Text, Parse).GetRoot().DescendantNodes().OfType<BaseNamespaceDeclarationSyntax>()
            .Select(ns => ns.Name.ToString())
            .Where(n => n != $"VlmTune.{file.Folder}" && !n.StartsWith($"VlmTune.{file.Folder}.", StringComparison.Ordinal));
}

/// <summary>One C# file of a folder of src/VlmTune.</summary>
public sealed record SourceFile(string Folder, string Path, string Text);

/// <summary>An arrow of the drawing: <see cref="From"/> uses <see cref="To"/>; <see cref="ClosesCycle"/> when drawn with ✗.</summary>
public sealed record DrawnArrow(string From, string To, bool ClosesCycle);

/// <summary>
/// The folder drawing of docs/architecture.md: in its fenced block, the lines after <c>src/VlmTune/</c> indented by four
/// spaces, each <c>Folder ──► Used, Used ✗, …</c> or <c>Folder, Folder ───</c> (folders that use none), optionally
/// followed by a parenthesised comment that may go on over more deeply indented lines.
/// </summary>
public static partial class FolderDrawing
{
    public const string Marker = "src/VlmTune/";

    [GeneratedRegex(@"^ {4}(?<from>[A-Z]\w*(?:, [A-Z]\w*)*) (?:──► (?<to>[A-Z]\w*(?: ✗)?(?:, [A-Z]\w*(?: ✗)?)*)|─+)(?:\s+\(.*)?\s*$")]
    private static partial Regex FolderLine();

    /// <summary>The folders drawn (each once, in drawing order) and the arrows; throws for a line that is neither form.</summary>
    public static (IReadOnlyList<string> Folders, IReadOnlyList<DrawnArrow> Arrows) Read(string markdown)
    {
        var lines = markdown.Split('\n').Select(l => l.TrimEnd('\r')).ToArray();
        bool fenced = false;
        int start = -1;
        for (int i = 0; i < lines.Length && start < 0; i++)
        {
            if (lines[i].TrimStart().StartsWith("```", StringComparison.Ordinal)) fenced = !fenced;
            else if (fenced && lines[i].Trim().StartsWith(Marker, StringComparison.Ordinal)) start = i;
        }
        if (start < 0) throw new FormatException($"no line starting with '{Marker}' in a fenced block (the folder drawing)");
        var folders = new List<string>();
        var arrows = new List<DrawnArrow>();
        for (int i = start + 1; i < lines.Length && !lines[i].TrimStart().StartsWith("```", StringComparison.Ordinal); i++)
        {
            if (!Regex.IsMatch(lines[i], @"^ {4}\S")) continue;   // blank, or a comment carried over from the line above
            var m = FolderLine().Match(lines[i]);
            if (!m.Success)
                throw new FormatException($"line {i + 1}: '{lines[i].Trim()}' is neither 'Folder ──► Used, Used ✗' nor 'Folder, Folder ───'");
            var from = m.Groups["from"].Value.Split(", ");
            folders.AddRange(from);
            if (!m.Groups["to"].Success) continue;
            foreach (var target in m.Groups["to"].Value.Split(", "))
                foreach (var f in from)
                    arrows.Add(new DrawnArrow(f, target.TrimEnd(' ', '✗'), target.EndsWith('✗')));
        }
        return (folders, arrows);
    }
}

/// <summary>Cycles of a directed graph given by its arrows.</summary>
public static class Cycles
{
    /// <summary>One cycle as its nodes, the first repeated at the end (A, B, A); null when there is none. Deterministic.</summary>
    public static IReadOnlyList<string>? Find(IEnumerable<(string From, string To)> arrows)
    {
        var next = arrows.GroupBy(a => a.From).ToDictionary(g => g.Key, g => g.Select(a => a.To).Distinct().Order(StringComparer.Ordinal).ToList());
        var state = new Dictionary<string, bool>();   // false: on the current path; true: done, no cycle through it
        var path = new List<string>();
        List<string>? Visit(string node)
        {
            if (state.TryGetValue(node, out bool done))
                return done ? null : [.. path.Skip(path.IndexOf(node)), node];
            state[node] = false;
            path.Add(node);
            foreach (var to in next.GetValueOrDefault(node) ?? [])
                if (Visit(to) is { } cycle) return cycle;
            path.RemoveAt(path.Count - 1);
            state[node] = true;
            return null;
        }
        foreach (var node in next.Keys.Order(StringComparer.Ordinal))
            if (Visit(node) is { } cycle) return cycle;
        return null;
    }
}
