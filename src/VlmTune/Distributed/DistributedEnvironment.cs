using System.Collections;
using System.Globalization;
using System.Text.RegularExpressions;

namespace VlmTune.Distributed;

/// <summary>
/// Where this process sits in a data-parallel job, read from the launcher's variables: torchrun's
/// (RANK, WORLD_SIZE, LOCAL_RANK, ...) first, then Slurm's (SLURM_PROCID, SLURM_NTASKS, ...); neither gives one process.
/// </summary>
public sealed record DistributedEnvironment(
    int Rank, int WorldSize, int LocalRank, int LocalWorldSize,
    int NodeRank, int NodeCount, string MasterAddress, int MasterPort, string Source)
{
    public const int DefaultMasterPort = 29500;

    public bool IsDistributed => WorldSize > 1;
    public bool IsMaster => Rank == 0;
    /// <summary>This process is a rank of a job (torchrun's, Slurm's or our launcher's variables), not a lone process.</summary>
    public bool StartedByLauncher => Source != Single.Source;

    public static DistributedEnvironment Single { get; } = new(0, 1, 0, 1, 0, 1, "127.0.0.1", DefaultMasterPort, "single process");

    public static DistributedEnvironment FromProcess() => FromEnvironment(Environment.GetEnvironmentVariables());

    /// <summary>Parses <paramref name="env"/>; every problem is reported at once, each naming its variable.</summary>
    public static DistributedEnvironment FromEnvironment(IDictionary env)
    {
        string? Get(string name) => env.Contains(name) && env[name] is string s && s.Trim().Length > 0 ? s.Trim() : null;
        var errors = new List<string>();

        int? Int(string name, int min)
        {
            var raw = Get(name);
            if (raw is null) return null;
            if (!int.TryParse(raw, NumberStyles.Integer, CultureInfo.InvariantCulture, out var v) || v < min)
            {
                errors.Add($"{name}='{raw}' is not an integer >= {min}");
                return null;
            }
            return v;
        }

        DistributedEnvironment result;
        if (Get("RANK") is not null || Get("WORLD_SIZE") is not null)
            result = FromTorchrun(Get, Int, errors);
        else if (Get("SLURM_PROCID") is not null && Get("SLURM_NTASKS") is not null)
            result = FromSlurm(Get, Int, errors);
        else
            return Single;

        if (errors.Count > 0)
            throw new DistributedException(
                $"invalid distributed launch variables ({result.Source}):\n  " + string.Join("\n  ", errors) +
                "\nSet them as torchrun or Slurm does (e.g. RANK=0 WORLD_SIZE=2 MASTER_ADDR=host MASTER_PORT=29500).");
        return result;
    }

    private static DistributedEnvironment FromTorchrun(Func<string, string?> get, Func<string, int, int?> num, List<string> errors)
    {
        const string source = "torchrun variables";
        var rank = num("RANK", 0);
        var world = num("WORLD_SIZE", 1);
        if (get("RANK") is null) errors.Add("RANK is missing (WORLD_SIZE is set)");
        if (get("WORLD_SIZE") is null) errors.Add("WORLD_SIZE is missing (RANK is set)");
        var r = rank ?? 0;
        var w = world ?? 1;
        if (rank is not null && world is not null && r >= w) errors.Add($"RANK={r} must be below WORLD_SIZE={w}");

        var nprocPerNode = num("NPROC_PER_NODE", 1);
        var localWorld = num("LOCAL_WORLD_SIZE", 1) ?? nprocPerNode ?? (get("NNODES") is null ? w : 1);
        var localRank = num("LOCAL_RANK", 0) ?? r % Math.Max(localWorld, 1);
        if (localRank >= localWorld) errors.Add($"LOCAL_RANK={localRank} must be below LOCAL_WORLD_SIZE={localWorld}");
        var nodes = num("NNODES", 1) ?? Math.Max(1, w / Math.Max(localWorld, 1));
        var nodeRank = num("NODE_RANK", 0) ?? r / Math.Max(localWorld, 1);
        if (nodeRank >= nodes) errors.Add($"NODE_RANK={nodeRank} must be below NNODES={nodes}");

        var (addr, port) = Master(get, num, errors, fallbackHost: null, requireAddress: w > 1);
        return new(r, w, localRank, localWorld, nodeRank, nodes, addr, port, source);
    }

    private static DistributedEnvironment FromSlurm(Func<string, string?> get, Func<string, int, int?> num, List<string> errors)
    {
        const string source = "Slurm variables";
        var r = num("SLURM_PROCID", 0) ?? 0;
        var w = num("SLURM_NTASKS", 1) ?? 1;
        if (r >= w) errors.Add($"SLURM_PROCID={r} must be below SLURM_NTASKS={w}");
        var nodes = num("SLURM_NNODES", 1) ?? 1;
        var nodeRank = num("SLURM_NODEID", 0) ?? 0;
        if (nodeRank >= nodes) errors.Add($"SLURM_NODEID={nodeRank} must be below SLURM_NNODES={nodes}");
        var localRank = num("SLURM_LOCALID", 0) ?? 0;
        // Tasks spread evenly over nodes is what srun does with --ntasks-per-node.
        var localWorld = num("SLURM_NTASKS_PER_NODE", 1) ?? Math.Max(1, w / nodes);

        string? host = null;
        if (get("SLURM_JOB_NODELIST") is { } list)
        {
            try { host = FirstHost(list); }
            catch (FormatException e) { errors.Add($"SLURM_JOB_NODELIST='{list}': {e.Message}"); }
        }
        var (addr, port) = Master(get, num, errors, host, requireAddress: w > 1);
        return new(r, w, localRank, localWorld, nodeRank, nodes, addr, port, source);
    }

    private static (string Address, int Port) Master(
        Func<string, string?> get, Func<string, int, int?> num, List<string> errors, string? fallbackHost, bool requireAddress)
    {
        var addr = get("MASTER_ADDR") ?? fallbackHost;
        if (addr is null)
        {
            if (requireAddress) errors.Add("MASTER_ADDR is missing (the host name or IP of rank 0)");
            addr = "127.0.0.1";
        }
        var port = num("MASTER_PORT", 1) ?? DefaultMasterPort;
        if (port > 65535) errors.Add($"MASTER_PORT={port} is not a TCP port (1-65535)");
        return (addr, port);
    }

    private static readonly Regex Bracket = new(@"^(?<prefix>[^\[,]*)\[(?<ranges>[^\]]+)\](?<suffix>[^,]*)");

    /// <summary>
    /// The first host of a Slurm node list: "gpu01,gpu02" → gpu01; "gpu[03-05,7]" → gpu03 (zero padding kept);
    /// "a[1-2],b3" → a1. Only the single-bracket form Slurm prints for one prefix is understood.
    /// </summary>
    public static string FirstHost(string nodeList)
    {
        var list = nodeList.Trim();
        if (list.Length == 0) throw new FormatException("empty node list");
        var m = Bracket.Match(list);
        var firstComma = list.IndexOf(',');
        if (m.Success && (firstComma < 0 || firstComma > m.Groups["prefix"].Length))
        {
            var first = m.Groups["ranges"].Value.Split(',')[0].Split('-')[0].Trim();
            if (first.Length == 0 || !first.All(char.IsAsciiDigit)) throw new FormatException($"'{m.Groups["ranges"].Value}' is not a range list like 1-3,5");
            return m.Groups["prefix"].Value + first + m.Groups["suffix"].Value;
        }
        var host = firstComma < 0 ? list : list[..firstComma];
        if (host.Contains('[') || host.Contains(']') || host.Length == 0) throw new FormatException("unbalanced brackets");
        return host;
    }
}
