using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace VlmTune.Distributed;

/// <summary>
/// <c>--nproc-per-node N</c>: starts N copies of this command on this node, one per GPU, with torchrun's variables
/// (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, NNODES, MASTER_ADDR, MASTER_PORT) and each child's
/// CUDA_VISIBLE_DEVICES narrowed to its GPU; then supervises them. Several nodes: run it on each node with NNODES,
/// NODE_RANK, MASTER_ADDR and MASTER_PORT set (as with torchrun). A rank that fails ends the job: the others are
/// stopped, and the exit code and message name it.
/// </summary>
public static class Launcher
{
    /// <summary>How long the other ranks get to notice a failed rank and exit on their own (with their message) before they are killed.</summary>
    public static readonly TimeSpan FailureGrace = TimeSpan.FromSeconds(5);

    /// <summary>Exit code of a rank (and of the job) stopped by a signal after saving its checkpoint.</summary>
    public const int Interrupted = 130;

    /// <summary>The variables for local process <paramref name="localRank"/> (pure, for tests).</summary>
    public static Dictionary<string, string> ChildEnvironment(int localRank, int nprocPerNode, IReadOnlyDictionary<string, string?> parent, int freePort)
    {
        int Int(string name, int fallback)
        {
            var raw = parent.GetValueOrDefault(name);
            if (raw is null || raw.Trim().Length == 0) return fallback;
            return int.TryParse(raw, out var v) && v >= 0 ? v : throw new DistributedException($"{name}='{raw}' is not a non-negative integer");
        }
        int nodes = Int("NNODES", 1), node = Int("NODE_RANK", 0);
        if (nodes < 1) throw new DistributedException("NNODES must be at least 1");
        if (node >= nodes) throw new DistributedException($"NODE_RANK={node} must be below NNODES={nodes}");
        string? master = parent.GetValueOrDefault("MASTER_ADDR");
        if (nodes > 1 && string.IsNullOrWhiteSpace(master))
            throw new DistributedException($"NNODES={nodes}: set MASTER_ADDR (the host name or IP of node 0) and MASTER_PORT on every node");
        int port = Int("MASTER_PORT", nodes > 1 ? DistributedEnvironment.DefaultMasterPort : freePort);

        var visible = parent.GetValueOrDefault("CUDA_VISIBLE_DEVICES");
        var gpus = visible?.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (gpus is not null && gpus.Length < nprocPerNode)
            throw new DistributedException($"--nproc-per-node {nprocPerNode} but CUDA_VISIBLE_DEVICES='{visible}' lists {gpus.Length} GPU(s)");

        return new Dictionary<string, string>
        {
            ["RANK"] = (node * nprocPerNode + localRank).ToString(),
            ["WORLD_SIZE"] = (nodes * nprocPerNode).ToString(),
            ["LOCAL_RANK"] = localRank.ToString(),
            ["LOCAL_WORLD_SIZE"] = nprocPerNode.ToString(),
            ["NODE_RANK"] = node.ToString(),
            ["NNODES"] = nodes.ToString(),
            ["MASTER_ADDR"] = string.IsNullOrWhiteSpace(master) ? "127.0.0.1" : master.Trim(),
            ["MASTER_PORT"] = port.ToString(),
            ["CUDA_VISIBLE_DEVICES"] = gpus is null ? localRank.ToString() : gpus[localRank],
            [RuntimeSwitches.GpuIsolatedVariable] = "1",   // CUDA_VISIBLE_DEVICES above is already the rank's one GPU
        };
    }

    /// <summary>
    /// The command line that reruns this program with <paramref name="args"/>: the app host itself, or
    /// <c>dotnet &lt;dll&gt;</c> when started through the dotnet host.
    /// </summary>
    public static (string File, List<string> Args) SelfCommand(IEnumerable<string> args)
    {
        string process = Environment.ProcessPath ?? throw new DistributedException("cannot find this program's path to start the ranks");
        var list = new List<string>();
        if (Path.GetFileNameWithoutExtension(process) == "dotnet") list.Add(Environment.GetCommandLineArgs()[0]);
        list.AddRange(args);
        return (process, list);
    }

    /// <summary>The arguments without <c>--nproc-per-node N</c> / <c>--nproc-per-node=N</c> (the children are ranks, not launchers).</summary>
    public static List<string> WithoutLauncherOptions(IReadOnlyList<string> args)
    {
        var result = new List<string>();
        for (int i = 0; i < args.Count; i++)
        {
            if (args[i] == "--nproc-per-node") { i++; continue; }
            if (args[i].StartsWith("--nproc-per-node=", StringComparison.Ordinal)) continue;
            result.Add(args[i]);
        }
        return result;
    }

    /// <summary>Runs the ranks to completion; returns 0, or the exit code of the first rank that failed.</summary>
    public static int Run(int nprocPerNode, IReadOnlyList<string> args, Action<string> say)
    {
        var parent = Environment.GetEnvironmentVariables().Cast<System.Collections.DictionaryEntry>()
            .ToDictionary(e => (string)e.Key, e => (string?)e.Value);
        int port = FreePort();
        var (file, childArgs) = SelfCommand(WithoutLauncherOptions(args));
        var children = new List<Process>();
        var first = ChildEnvironment(0, nprocPerNode, parent, port);
        say($"launching {nprocPerNode} processes on node {first["NODE_RANK"]} of {first["NNODES"]} (world size {first["WORLD_SIZE"]}, master {first["MASTER_ADDR"]}:{first["MASTER_PORT"]})");

        int signals = 0;
        void OnSignal(PosixSignalContext context)
        {
            // Ctrl-C reaches every rank from the terminal; SIGTERM (a scheduler) only us, so it is passed on. Each rank
            // then stops at the same iteration and saves. A second signal kills them.
            context.Cancel = true;
            if (Interlocked.Increment(ref signals) == 1)
            {
                say("stopping: the ranks finish the current iteration and save a checkpoint (signal again to kill them)");
                if (context.Signal == PosixSignal.SIGTERM) foreach (var c in children) Signal(c, 15);
            }
            else foreach (var c in children) Kill(c);
        }
        using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, OnSignal);
        using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, OnSignal);

        try
        {
            for (int i = 0; i < nprocPerNode; i++)
            {
                var info = new ProcessStartInfo(file) { UseShellExecute = false };
                foreach (var a in childArgs) info.ArgumentList.Add(a);
                foreach (var (k, v) in ChildEnvironment(i, nprocPerNode, parent, port)) info.Environment[k] = v;
                info.Environment.Remove("NPROC_PER_NODE");
                children.Add(Process.Start(info) ?? throw new DistributedException($"could not start rank {i}"));
            }

            while (true)
            {
                // The first rank (in rank order) seen to fail is reported, even if several ended between two looks.
                // After a stop signal, ranks that saved and exited as interrupted (130) have not failed.
                bool stopping = Volatile.Read(ref signals) > 0;
                var done = children.FirstOrDefault(c => c.HasExited && c.ExitCode != 0 && !(stopping && c.ExitCode == Interrupted));
                if (done is not null)
                {
                    int code = done.ExitCode;
                    say($"error: rank {int.Parse(first["RANK"]) + children.IndexOf(done)} exited with code {Describe(code)}; stopping the other ranks " +
                        "(the last checkpoint is intact; resume with --resume auto)");
                    var deadline = DateTime.UtcNow + FailureGrace;
                    while (DateTime.UtcNow < deadline && children.Any(c => !c.HasExited)) Thread.Sleep(100);
                    foreach (var c in children) Kill(c);
                    foreach (var c in children) c.WaitForExit();
                    return code;
                }
                if (children.All(c => c.HasExited)) return children.Any(c => c.ExitCode == Interrupted) ? Interrupted : 0;
                Thread.Sleep(100);
            }
        }
        finally
        {
            foreach (var c in children) { Kill(c); c.Dispose(); }
        }
    }

    private static string Describe(int code) => code > 128 && code < 160 ? $"{code} (killed by signal {code - 128})" : code.ToString();

    private static void Kill(Process p)
    {
        try { if (!p.HasExited) p.Kill(entireProcessTree: true); } catch (InvalidOperationException) { }
    }

    [DllImport("libc", EntryPoint = "kill")]
    private static extern int SysKill(int pid, int signal);

    private static void Signal(Process p, int signal)
    {
        try { if (!p.HasExited) SysKill(p.Id, signal); } catch (InvalidOperationException) { }
    }

    private static int FreePort()
    {
        using var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        return ((IPEndPoint)l.LocalEndpoint).Port;
    }
}
