using System.Runtime.InteropServices;
using System.Text.RegularExpressions;
using TorchSharp;
using TorchSharp.Modules;
using VlmTune.Cuda;
using static TorchSharp.torch;

namespace VlmTune.Distributed;

/// <summary>
/// One rank's side of data-parallel training. The control plane is the <see cref="TcpRendezvous"/> (join, the small
/// per-iteration agreement on token counts / losses / stop, barriers); tensors travel over NCCL on GPUs, on the
/// rendezvous for CPU-only runs (tests, machines without GPUs: NCCL needs CUDA).
/// Gradients are reduced in buckets, one per decoder layer (its LoRA / weights) plus one for everything else. With
/// activation checkpointing the trainer reports each layer's backward as finished; that layer's bucket is then
/// all-reduced on a second CUDA stream while the backward pass goes on with the layers below it.
/// </summary>
public sealed partial class DataParallel : IDisposable
{
    private readonly NcclCommunicator? _nccl;
    private readonly CudaDriver? _cuda;
    private readonly IntPtr _commStream, _event;
    private readonly Watchdog _watchdog;
    private List<Bucket> _buckets = [];
    private Dictionary<int, Bucket> _layerBuckets = [];
    private volatile bool _reduceInBackward;

    public DistributedEnvironment Env { get; }
    public TcpRendezvous Rendezvous { get; }
    public int Rank => Env.Rank;
    public int WorldSize => Env.WorldSize;
    public bool IsMaster => Env.IsMaster;
    /// <summary>"nccl" or "tcp" (CPU tensors).</summary>
    public string Backend => _nccl is null ? "tcp" : "nccl";
    public int BucketCount => _buckets.Count;

    private DataParallel(DistributedEnvironment env, TcpRendezvous rendezvous, NcclCommunicator? nccl, CudaDriver? cuda, TimeSpan timeout)
    {
        Env = env; Rendezvous = rendezvous; _nccl = nccl; _cuda = cuda;
        if (cuda is not null)
        {
            cuda.UsePrimaryContext(0);
            _commStream = cuda.CreateNonBlockingStream();
            _event = cuda.CreateEvent();
        }
        // Later than the rendezvous' own deadline: where a rank can still talk, rank 0's verdict naming the culprit
        // comes first; the watchdog is the backstop for ranks stuck where nothing else can notice.
        _watchdog = new Watchdog(this, timeout + TimeSpan.FromSeconds(Math.Max(15, timeout.TotalSeconds / 2)));
    }

    /// <summary>
    /// Before anything touches CUDA: restricts this process to its GPU (LOCAL_RANK-th of those visible), so "cuda" means
    /// that GPU for TorchSharp, NCCL and the driver alike. The variable must be set in the native environment (setenv):
    /// .NET's Environment.SetEnvironmentVariable does not reach the CUDA runtime. <paramref name="isolated"/>: the
    /// launcher already did (<see cref="RuntimeSwitches.GpuIsolated"/>); a second call in one process does nothing.
    /// </summary>
    public static void BindLocalGpu(DistributedEnvironment env, bool isolated)
    {
        if (!env.IsDistributed || isolated || Volatile.Read(ref _bound)) return;
        var visible = Environment.GetEnvironmentVariable("CUDA_VISIBLE_DEVICES");
        var list = visible is null ? null : visible.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        string mine = list is null ? env.LocalRank.ToString() : env.LocalRank < list.Length ? list[env.LocalRank]
            : throw new DistributedException($"LOCAL_RANK={env.LocalRank} but CUDA_VISIBLE_DEVICES='{visible}' lists only {list.Length} GPU(s).");
        if (setenv("CUDA_VISIBLE_DEVICES", mine, 1) != 0) throw new DistributedException("setenv(CUDA_VISIBLE_DEVICES) failed");
        setenv(RuntimeSwitches.GpuIsolatedVariable, "1", 1);   // for processes this one starts
        // .NET keeps its own copy of the environment: update it too, for readers such as GpuMemoryMonitor.
        Environment.SetEnvironmentVariable("CUDA_VISIBLE_DEVICES", mine);
        Environment.SetEnvironmentVariable(RuntimeSwitches.GpuIsolatedVariable, "1");
        Volatile.Write(ref _bound, true);
    }

    private static bool _bound;   // this process narrowed CUDA_VISIBLE_DEVICES already: LOCAL_RANK no longer indexes it

    [LibraryImport("libc", StringMarshalling = StringMarshalling.Utf8)]
    private static partial int setenv(string name, string value, int overwrite);

    /// <summary>Joins the job: rendezvous (every rank or a clear error), then NCCL on CUDA.</summary>
    public static DataParallel Start(DistributedEnvironment env, Device device, TimeSpan timeout)
    {
        var rendezvous = TcpRendezvous.Connect(env, timeout);
        try
        {
            if (device.type != DeviceType.CUDA) return new DataParallel(env, rendezvous, null, null, timeout);
            using (zeros(1, device: device)) { }   // the CUDA context exists before NCCL and the driver calls
            var library = NcclLibrary.Load();
            var id = rendezvous.Broadcast(env.IsMaster ? library.NewUniqueId() : null);
            var nccl = new NcclCommunicator(library, id, env.Rank, env.WorldSize);
            return new DataParallel(env, rendezvous, nccl, CudaDriver.Shared, timeout);
        }
        catch (Exception e) when (e is not DistributedException)
        {
            rendezvous.Abort(e.Message);
            rendezvous.Dispose();
            throw;
        }
    }

    private sealed record Bucket(string Name, IReadOnlyList<Parameter> Parameters, Tensor? Flat)
    {
        public bool Launched;
    }

    private static readonly Regex LayerName = new(@"(?:^|\.)language_model\.model\.layers\.(\d+)\.", RegexOptions.Compiled);

    /// <summary>Plans the gradient buckets: one per decoder layer and dtype, one per dtype for the rest. Same plan on every rank.</summary>
    public void Prepare(IReadOnlyList<(string Name, Parameter Param)> trainable)
    {
        foreach (var b in _buckets) b.Flat?.Dispose();
        var groups = trainable
            .GroupBy(t => (Layer: LayerName.Match(t.Name) is { Success: true } m ? int.Parse(m.Groups[1].Value) : -1, t.Param.dtype))
            // Layers in backward order (last first), the rest after them: the order every rank launches them in.
            .OrderByDescending(g => g.Key.Layer).ThenBy(g => g.Key.dtype)
            .ToList();
        _buckets = [];
        _layerBuckets = [];
        foreach (var g in groups)
        {
            var ps = g.Select(t => t.Param).ToList();
            long n = ps.Sum(p => p.numel());
            var flat = _nccl is null ? null : zeros(n, g.Key.dtype, ps[0].device).DetachFromDisposeScope();
            var bucket = new Bucket(g.Key.Layer >= 0 ? $"layer {g.Key.Layer}" : "other", ps, flat);
            _buckets.Add(bucket);
            // A layer with two dtypes (rare) is reduced at the end rather than split between hook and end.
            if (g.Key.Layer >= 0 && !_layerBuckets.TryAdd(g.Key.Layer, bucket)) _layerBuckets[g.Key.Layer] = null!;
        }
        foreach (var k in _layerBuckets.Where(kv => kv.Value is null).Select(kv => kv.Key).ToList()) _layerBuckets.Remove(k);
    }

    /// <summary>Called before each micro-batch's backward: <paramref name="reduce"/> on the last micro-batch of an accumulation cycle.</summary>
    public void BeginBackward(bool reduce)
    {
        _reduceInBackward = reduce && _nccl is not null;
        if (reduce) foreach (var b in _buckets) b.Launched = false;
    }

    /// <summary>
    /// The backward pass has finished decoder layer <paramref name="layer"/> (called on autograd's thread): its gradients
    /// are final for this cycle, so its bucket's all-reduce starts now, beside the rest of the backward pass.
    /// </summary>
    public void LayerGradientsReady(int layer)
    {
        if (!_reduceInBackward || !_layerBuckets.TryGetValue(layer, out var bucket) || bucket.Launched) return;
        Launch(bucket);
    }

    /// <summary>
    /// After the cycle's last backward: reduces the buckets not yet started, waits for all, and leaves every trainable
    /// parameter's gradient equal to the sum over ranks (the trainer already scaled each rank's loss for that).
    /// </summary>
    public void FinishGradients()
    {
        _reduceInBackward = false;
        if (_nccl is null) { ReduceOverTcp(); return; }
        foreach (var b in _buckets.Where(b => !b.Launched)) Launch(b);
        _cuda!.UsePrimaryContext(0);
        _cuda.Order(_commStream, CudaDriver.DefaultStream, _event);   // stream 0 waits for every all-reduce
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        foreach (var b in _buckets) Unflatten(b.Flat!, b.Parameters);
    }

    private void Launch(Bucket bucket)
    {
        using (var scope = NewDisposeScope())
        using (no_grad())
        {
            long offset = 0;
            foreach (var p in bucket.Parameters)
            {
                long n = p.numel();
                var slot = bucket.Flat!.narrow(0, offset, n);
                if (p.grad is { } g) slot.copy_(g.reshape(-1)); else slot.zero_();
                offset += n;
            }
        }
        // Possibly on autograd's thread: the driver needs the context current there.
        _cuda!.UsePrimaryContext(0);
        _cuda.Order(CudaDriver.DefaultStream, _commStream, _event);   // the copies above are done before NCCL reads
        _nccl!.AllReduce(bucket.Flat!, NcclReduceOp.Sum, _commStream);
        bucket.Launched = true;
    }

    private static void Unflatten(Tensor flat, IReadOnlyList<Parameter> parameters)
    {
        long offset = 0;
        foreach (var p in parameters)
        {
            long n = p.numel();
            var value = flat.narrow(0, offset, n).view(p.shape);
            if (p.grad is { } g) g.copy_(value);
            else using (enable_grad()) p.backward([value.clone()]);   // a leaf's backward creates its .grad
            offset += n;
        }
    }

    /// <summary>CPU runs: each bucket summed over the rendezvous, in rank order (bit-identical on every rank).</summary>
    private void ReduceOverTcp()
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        foreach (var b in _buckets)
        {
            var flat = cat(b.Parameters.Select(p => p.grad is { } g ? g.reshape(-1) : zeros(p.numel(), p.dtype, p.device)).ToArray())
                .to_type(ScalarType.Float64).cpu().contiguous();
            var sum = AllReduceLarge(flat.data<double>().ToArray());
            Unflatten(tensor(sum).to_type(b.Parameters[0].dtype).to(b.Parameters[0].device), b.Parameters);
        }
    }

    private double[] AllReduceLarge(double[] values)
    {
        int chunk = TcpRendezvous.MaxPayloadBytes / sizeof(double) / WorldSize;
        var result = new double[values.Length];
        for (int start = 0; start < values.Length || start == 0; start += chunk)
        {
            int n = Math.Min(chunk, values.Length - start);
            Rendezvous.AllReduceSum(values.AsSpan(start, n)).CopyTo(result, start);
            if (n == 0) break;
        }
        return result;
    }

    /// <summary>
    /// Every rank's copy of each tensor becomes its owner's (ZeRO-1 after a step; rank 0 for the initial weights).
    /// Tensors must be contiguous; every rank passes the same list in the same order.
    /// </summary>
    public void BroadcastFromOwners(IReadOnlyList<(Tensor Tensor, int Owner)> tensors)
    {
        using var noGrad = no_grad();
        if (_nccl is not null)
        {
            _nccl.Group(() => { foreach (var (t, owner) in tensors) _nccl.Broadcast(t, owner); });
            return;
        }
        foreach (var (t, owner) in tensors)
        {
            using var scope = NewDisposeScope();
            var mine = Rank == owner ? t.to_type(ScalarType.Float64).cpu().contiguous().data<double>().ToArray() : new double[t.numel()];
            var value = AllReduceLarge(mine);   // only the owner contributes non-zeros
            t.copy_(tensor(value).view(t.shape).to_type(t.dtype));
        }
    }

    /// <summary>Element-wise sums over ranks of a few host values (bit-identical everywhere).</summary>
    public double[] SumOverRanks(params double[] values) => Rendezvous.AllReduceSum(values);

    public void Barrier() => Rendezvous.Barrier();

    /// <summary>Rank 0's string, everywhere (e.g. the temporary checkpoint folder).</summary>
    public string Broadcast(string? value) =>
        System.Text.Encoding.UTF8.GetString(Rendezvous.Broadcast(IsMaster ? System.Text.Encoding.UTF8.GetBytes(value ?? "") : null));

    /// <summary>Tells the watchdog the training loop made progress.</summary>
    public void Heartbeat() => _watchdog.Beat();

    /// <summary>Ends the job from this rank: tells the others (rendezvous), unblocks NCCL.</summary>
    public void Abort(string reason)
    {
        Rendezvous.Abort(reason);
        try { _nccl?.Abort(); } catch (DistributedException) { }
    }

    public void Dispose()
    {
        _watchdog.Dispose();
        foreach (var b in _buckets) b.Flat?.Dispose();
        try { _nccl?.Dispose(); } catch (DistributedException) { }
        Rendezvous.Dispose();
    }

    /// <summary>
    /// A rank blocked inside a collective (its peer died or hangs) cannot notice anything itself: the GPU waits forever.
    /// This thread ends such a job: no training progress for the timeout, or an asynchronous NCCL error, prints why,
    /// aborts NCCL and exits the process (the launcher then stops the other ranks). Checkpoints are written atomically,
    /// so the last complete one is intact.
    /// </summary>
    private sealed class Watchdog : IDisposable
    {
        private readonly DataParallel _owner;
        private readonly TimeSpan _timeout;
        private long _lastBeat = Environment.TickCount64;
        private volatile bool _armed;   // from the first beat: loading and data indexing before training are not timed
        private volatile bool _stopped;
        private readonly Thread _thread;

        public Watchdog(DataParallel owner, TimeSpan timeout)
        {
            _owner = owner; _timeout = timeout;
            _thread = new Thread(Run) { IsBackground = true, Name = "vlmtune-dist-watchdog" };
            _thread.Start();
        }

        public void Beat()
        {
            Interlocked.Exchange(ref _lastBeat, Environment.TickCount64);
            _armed = true;
        }

        private void Run()
        {
            while (!_stopped)
            {
                Thread.Sleep(500);
                if (_stopped) return;
                string? why = null;
                try { _owner._nccl?.CheckAsyncError(); }
                catch (DistributedException e) { why = e.Message; }
                var idle = TimeSpan.FromMilliseconds(Environment.TickCount64 - Interlocked.Read(ref _lastBeat));
                if (why is null && _armed && idle > _timeout)
                    why = $"no training progress for {idle.TotalSeconds:0} s: this rank is stuck, most likely waiting in a collective for a rank that hung or died";
                if (why is null) continue;
                Console.Error.WriteLine($"error: rank {_owner.Rank}: {why}; ending the job (the last checkpoint is intact; resume with --resume auto)");
                Console.Error.Flush();
                try { _owner.Rendezvous.Abort(why); } catch { }
                try { _owner._nccl?.Abort(); } catch { }
                VlmTune.Diagnostics.ProcessExit.Now(3);
            }
        }

        public void Dispose() => _stopped = true;
    }
}
