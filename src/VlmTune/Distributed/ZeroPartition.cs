namespace VlmTune.Distributed;

/// <summary>
/// ZeRO stage 1: each trainable parameter's optimizer state (AdamW moments, fp32 master copy) lives on exactly one
/// rank, which updates it and then broadcasts the new weights. Whole parameters are assigned (no splitting), greedily:
/// largest first onto the least-loaded rank (ties: lower rank), which is deterministic given the same list on every rank.
/// </summary>
public sealed class ZeroPartition
{
    /// <summary>Owner rank of each parameter, by name.</summary>
    public IReadOnlyDictionary<string, int> Owner { get; }
    /// <summary>Elements owned per rank.</summary>
    public IReadOnlyList<long> Load { get; }
    public int WorldSize => Load.Count;

    private readonly IReadOnlyList<(string Name, long Numel)> _parameters;

    private ZeroPartition(IReadOnlyList<(string, long)> parameters, Dictionary<string, int> owner, long[] load)
    {
        _parameters = parameters; Owner = owner; Load = load;
    }

    /// <summary>Max over min rank load (1 = perfect; infinity when a rank owns nothing, e.g. fewer parameters than ranks).</summary>
    public double Imbalance => Load.Min() == 0 ? (Load.Max() == 0 ? 1 : double.PositiveInfinity) : (double)Load.Max() / Load.Min();

    public static ZeroPartition Plan(IReadOnlyList<(string Name, long Numel)> parameters, int worldSize)
    {
        ArgumentNullException.ThrowIfNull(parameters);
        if (worldSize < 1) throw new ArgumentOutOfRangeException(nameof(worldSize), worldSize, "must be >= 1");
        var seen = new HashSet<string>();
        foreach (var (name, numel) in parameters)
        {
            if (!seen.Add(name)) throw new ArgumentException($"parameter '{name}' is listed twice", nameof(parameters));
            if (numel < 0) throw new ArgumentException($"parameter '{name}' has {numel} elements", nameof(parameters));
        }

        var load = new long[worldSize];
        var owner = new Dictionary<string, int>(parameters.Count);
        // Ordinal name order breaks size ties so the plan does not depend on the caller's list order.
        foreach (var (name, numel) in parameters.OrderByDescending(p => p.Numel).ThenBy(p => p.Name, StringComparer.Ordinal))
        {
            var target = 0;
            for (var r = 1; r < worldSize; r++) if (load[r] < load[target]) target = r;
            owner[name] = target;
            load[target] += numel;
        }
        return new ZeroPartition(parameters, owner, load);
    }

    /// <summary>The parameters rank <paramref name="rank"/> owns, in the caller's original order.</summary>
    public IReadOnlyList<string> ParametersOf(int rank)
    {
        if (rank < 0 || rank >= WorldSize) throw new ArgumentOutOfRangeException(nameof(rank), rank, $"must be in [0, {WorldSize})");
        return _parameters.Where(p => Owner[p.Name] == rank).Select(p => p.Name).ToList();
    }
}
