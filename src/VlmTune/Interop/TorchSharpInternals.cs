using System.Collections.Concurrent;
using System.Reflection;
using TorchSharp;
using static TorchSharp.torch;

namespace VlmTune.Interop;

/// <summary>
/// Every use of TorchSharp's non-public members, in one file, written against TorchSharp <see cref="WrittenFor"/>.x.
/// The members are looked up once. On another TorchSharp version, or where one is missing or changed type,
/// <see cref="Problem"/> says why and nothing here touches TorchSharp's internals: callers fall back to what TorchSharp
/// does without them (<see cref="WarnOnce"/>). Tests pin the members on the referenced TorchSharp, so an upgrade that
/// moves them fails there first.
/// </summary>
internal static class TorchSharpInternals
{
    /// <summary>The TorchSharp version (major.minor) whose private members this file names.</summary>
    public static readonly Version WrittenFor = new(0, 107);

    /// <summary>The TorchSharp assembly loaded in this process.</summary>
    public static Version Loaded { get; } = typeof(torch).Assembly.GetName().Version ?? new Version(0, 0);

    // AutogradContext._node: the autograd Node of one custom-function call, declared as Node but a Node<T>.
    // Node<T>._outputCache: for each output, the empty_like copy TorchSharp keeps until the node's backward.
    private const string ContextNodeName = "_node", OutputCacheName = "_outputCache";
    private const BindingFlags Private = BindingFlags.NonPublic | BindingFlags.Instance;

    private static readonly FieldInfo? ContextNode;
    private static readonly FieldInfo? NodeOutputCache;   // on the generic definition Node<T>
    private static readonly ConcurrentDictionary<Type, FieldInfo?> ClosedOutputCache = new();

    /// <summary>Why the internals are not used in this process; null when they are.</summary>
    public static string? Problem { get; }

    private static int _warned;

    static TorchSharpInternals()
    {
        var node = typeof(autograd.AutogradContext).GetField(ContextNodeName, Private);
        var generic = node is null ? null : typeof(torch).Assembly.GetType(node.FieldType.FullName + "`1");
        var cache = generic is not null && generic.IsSubclassOf(node!.FieldType) ? generic.GetField(OutputCacheName, Private) : null;
        Problem = Diagnose(Loaded, node, cache);
        if (Problem is null) (ContextNode, NodeOutputCache) = (node, cache);
    }

    /// <summary>What is wrong with these lookups on a TorchSharp of version <paramref name="loaded"/>; null if nothing.</summary>
    internal static string? Diagnose(Version loaded, FieldInfo? contextNode, FieldInfo? outputCache)
    {
        if (loaded.Major != WrittenFor.Major || loaded.Minor != WrittenFor.Minor)
            return $"TorchSharp {loaded} is not the {WrittenFor}.x whose internals VlmTune reads";
        if (contextNode is null) return $"TorchSharp {loaded} has no {nameof(autograd.AutogradContext)}.{ContextNodeName}";
        if (outputCache is null) return $"TorchSharp {loaded} has no {contextNode.FieldType.Name}<T>.{OutputCacheName}";
        if (!outputCache.FieldType.IsAssignableTo(typeof(List<Tensor>)))
            return $"TorchSharp {loaded}'s {contextNode.FieldType.Name}<T>.{OutputCacheName} is a {outputCache.FieldType.Name}, not a List<Tensor>";
        return null;
    }

    /// <summary>
    /// The per-output cache of the node behind <paramref name="ctx"/> (entries may be replaced, not removed); null
    /// where the internals are unavailable (<see cref="Problem"/>) or the call recorded no node.
    /// </summary>
    public static List<Tensor>? OutputCache(autograd.AutogradContext ctx)
    {
        if (ContextNode?.GetValue(ctx) is not { } node) return null;
        var field = ClosedOutputCache.GetOrAdd(node.GetType(), static t =>
            t.IsGenericType && t.GetGenericTypeDefinition() == NodeOutputCache!.DeclaringType ? t.GetField(OutputCacheName, Private) : null);
        return field?.GetValue(node) as List<Tensor>;
    }

    /// <summary>Says once per process on stderr that <paramref name="what"/> falls back, and why.</summary>
    public static void WarnOnce(string what)
    {
        if (Problem is null || Interlocked.Exchange(ref _warned, 1) == 1) return;
        Console.Error.WriteLine($"warning: {Problem}; {what}.");
    }
}
