namespace VlmTune.Cuda;

/// <summary>One kernel launch, everything a CUDA graph node bakes in: the function, the shape and the argument slots.</summary>
public sealed record KernelLaunch(IntPtr Function, (uint X, uint Y, uint Z) Grid, uint Block, uint SharedBytes, long[] Args)
{
    public bool Equals(KernelLaunch? other) =>
        other is not null && Function == other.Function && Grid == other.Grid && Block == other.Block
        && SharedBytes == other.SharedBytes && Args.AsSpan().SequenceEqual(other.Args);

    public override int GetHashCode()
    {
        var hash = new HashCode();
        hash.Add(Function); hash.Add(Grid); hash.Add(Block); hash.Add(SharedBytes);
        foreach (var a in Args) hash.Add(a);
        return hash.ToHashCode();
    }
}

/// <summary>The kernel launches of one step, in order; equal sequences are the same graph.</summary>
public sealed class LaunchSequence : IEquatable<LaunchSequence>
{
    private readonly List<KernelLaunch> _launches = [];

    public IReadOnlyList<KernelLaunch> Launches => _launches;

    public void Add(IntPtr function, (uint X, uint Y, uint Z) grid, uint block, uint sharedBytes, params long[] args) =>
        _launches.Add(new KernelLaunch(function, grid, block, sharedBytes, args));

    public bool Equals(LaunchSequence? other) => other is not null && _launches.SequenceEqual(other._launches);
    public override bool Equals(object? obj) => Equals(obj as LaunchSequence);

    public override int GetHashCode()
    {
        var hash = new HashCode();
        foreach (var l in _launches) hash.Add(l);
        return hash.ToHashCode();
    }
}

/// <summary>Runs launch sequences: directly, or captured once into a graph and replayed (<see cref="CudaGraphExecutor"/>).</summary>
public interface IGraphExecutor
{
    void Launch(LaunchSequence sequence);
    IntPtr Capture(LaunchSequence sequence);
    void Replay(IntPtr graph);
    void Destroy(IntPtr graph);
}

public enum GraphRun { Direct, Captured, Replayed }

/// <summary>
/// Replays a step's kernel launches as one CUDA graph instead of one launch each (a decode step of a 24-layer model is
/// ~220 launches, which the host issues more slowly than the GPU runs them at small batches). A sequence is captured
/// the second time it comes among the last <see cref="Capacity"/> distinct ones (a batch whose shape changes every
/// step costs no capture; a batched step and a solo one taking turns are both captured), and kept while among the
/// <see cref="Capacity"/> most recently used; a graph is only replayed for a sequence equal to the one it was
/// captured from, so every pointer and size it bakes in is the step's own. What changes every step must therefore
/// reach the kernels through device memory, not arguments (the decoder's step buffer and input slots).
/// </summary>
public sealed class KernelGraphCache(IGraphExecutor executor, int capacity = 8) : IDisposable
{
    private readonly Dictionary<LaunchSequence, (IntPtr Graph, long LastUse)> _graphs = [];
    private readonly LinkedList<LaunchSequence> _recent = [];   // run directly, most recent first
    private long _clock;

    public int Capacity { get; } = capacity;
    public long Captures { get; private set; }
    public long Replays { get; private set; }
    public long DirectRuns { get; private set; }
    public int Count => _graphs.Count;

    /// <summary>Why captures stopped (a capture or instantiation the driver refused); null while they work.</summary>
    public string? DisabledReason { get; private set; }

    public GraphRun Run(LaunchSequence sequence)
    {
        _clock++;
        if (DisabledReason is not null)
        {
            executor.Launch(sequence);
            DirectRuns++;
            return GraphRun.Direct;
        }
        if (_graphs.TryGetValue(sequence, out var known))
        {
            executor.Replay(known.Graph);
            _graphs[sequence] = (known.Graph, _clock);
            Replays++;
            return GraphRun.Replayed;
        }
        if (_recent.Find(sequence) is { } seen)
        {
            _recent.Remove(seen);
            if (_graphs.Count >= Capacity)
            {
                var oldest = _graphs.MinBy(g => g.Value.LastUse);
                executor.Destroy(oldest.Value.Graph);
                _graphs.Remove(oldest.Key);
            }
            IntPtr graph;
            try { graph = executor.Capture(sequence); }
            catch (CudaException e)
            {
                // Launched one by one from now on: the same kernels, so only the speed-up is lost.
                DisabledReason = e.Message;
                executor.Launch(sequence);
                DirectRuns++;
                return GraphRun.Direct;
            }
            _graphs[sequence] = (graph, _clock);
            executor.Replay(graph);
            Captures++;
            return GraphRun.Captured;
        }
        executor.Launch(sequence);
        _recent.AddFirst(sequence);
        if (_recent.Count > Capacity) _recent.RemoveLast();
        DirectRuns++;
        return GraphRun.Direct;
    }

    public void Dispose()
    {
        foreach (var (graph, _) in _graphs.Values) executor.Destroy(graph);
        _graphs.Clear();
    }
}

/// <summary>
/// Launch sequences on the CUDA driver: direct launches and replays on the legacy default stream, where TorchSharp's
/// work runs (so both stay ordered with it); captures on a stream of its own, since the default one cannot be captured.
/// </summary>
public sealed class CudaGraphExecutor(CudaDriver driver) : IGraphExecutor
{
    private IntPtr _captureStream;

    public void Launch(LaunchSequence sequence)
    {
        foreach (var l in sequence.Launches) driver.Launch(l.Function, l.Grid, l.Block, l.SharedBytes, l.Args);
    }

    public IntPtr Capture(LaunchSequence sequence)
    {
        if (_captureStream == IntPtr.Zero) _captureStream = driver.CreateNonBlockingStream();
        return driver.CaptureGraph(_captureStream, () =>
        {
            foreach (var l in sequence.Launches) driver.Launch(l.Function, l.Grid, l.Block, l.SharedBytes, l.Args, _captureStream);
        });
    }

    public void Replay(IntPtr graph) => driver.LaunchGraph(graph, CudaDriver.DefaultStream);

    public void Destroy(IntPtr graph) => driver.DestroyGraph(graph);
}
