using VlmTune.Cuda;

namespace VlmTune.Tests.Cuda;

/// <summary>
/// When the fused decoder's steps are captured into CUDA graphs and replayed (Cuda/KernelGraphs.cs), on a recording
/// executor: the CUDA side runs in the GPU tests (FusedDecoderGraphTests).
/// </summary>
public sealed class KernelGraphCacheTests
{
    private sealed class Recorder : IGraphExecutor
    {
        private long _next = 100;
        public bool RefuseCaptures { get; init; }
        public List<string> Calls { get; } = [];
        public Dictionary<IntPtr, LaunchSequence> Live { get; } = [];
        public void Launch(LaunchSequence s) => Calls.Add($"launch {Name(s)}");
        public IntPtr Capture(LaunchSequence s)
        {
            if (RefuseCaptures) throw new CudaException("cuStreamBeginCapture failed: CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED");
            var g = (IntPtr)_next++;
            Live[g] = s;
            Calls.Add($"capture {Name(s)}");
            return g;
        }
        public void Replay(IntPtr g) => Calls.Add($"replay {Name(Live[g])}");
        public void Destroy(IntPtr g) { Calls.Add($"destroy {Name(Live[g])}"); Live.Remove(g); }
        private static string Name(LaunchSequence s) => ((char)('A' + s.Launches[0].Args[0])).ToString();
    }

    /// <summary>A step of two launches; <paramref name="which"/> names it, <paramref name="column"/> stands for a pointer or size.</summary>
    private static LaunchSequence Step(int which, long column = 7)
    {
        var s = new LaunchSequence();
        s.Add(1, (1, 1, 1), 256, 0, which, 2, column);
        s.Add(2, (4, 2, 1), 128, 0, which, column);
        return s;
    }

    [Fact]
    public void ASequenceIsCapturedTheSecondTimeAndReplayedAfter()
    {
        var recorder = new Recorder();
        using var cache = new KernelGraphCache(recorder);
        Assert.Equal(GraphRun.Direct, cache.Run(Step(0)));
        Assert.Equal(GraphRun.Captured, cache.Run(Step(0)));   // an equal sequence, built anew
        Assert.Equal(GraphRun.Replayed, cache.Run(Step(0)));
        Assert.Equal(["launch A", "capture A", "replay A", "replay A"], recorder.Calls);
        Assert.Equal((1L, 1L, 1L), (cache.Captures, cache.Replays, cache.DirectRuns));
    }

    [Fact]
    public void AnyDifferentArgumentOrShapeIsAnotherGraph()
    {
        Assert.Equal(Step(0), Step(0));
        Assert.NotEqual(Step(0), Step(0, column: 8));
        var grid = new LaunchSequence();
        grid.Add(1, (1, 1, 1), 256, 0, 0, 2, 7);
        grid.Add(2, (5, 2, 1), 128, 0, 0, 7);
        Assert.NotEqual(Step(0), grid);

        var recorder = new Recorder();
        using var cache = new KernelGraphCache(recorder);
        for (long column = 0; column < 5; column++) Assert.Equal(GraphRun.Direct, cache.Run(Step(0, column)));   // a shape that changes every step
        Assert.Equal(0, cache.Captures);
    }

    [Fact]
    public void StepsTakingTurnsAreBothCaptured()
    {
        var recorder = new Recorder();
        using var cache = new KernelGraphCache(recorder);
        var runs = Enumerable.Range(0, 6).Select(i => cache.Run(Step(i % 2))).ToList();
        Assert.Equal([GraphRun.Direct, GraphRun.Direct, GraphRun.Captured, GraphRun.Captured, GraphRun.Replayed, GraphRun.Replayed], runs);
    }

    [Fact]
    public void TheLeastRecentlyUsedGraphGoesBeyondTheCapacityAndAllOnDispose()
    {
        var recorder = new Recorder();
        var cache = new KernelGraphCache(recorder, capacity: 2);
        foreach (var which in new[] { 0, 0, 1, 1, 0, 2, 2 }) cache.Run(Step(which));   // A, B captured; A used again; C evicts B
        Assert.Contains("destroy B", recorder.Calls);
        Assert.DoesNotContain("destroy A", recorder.Calls);
        Assert.Equal(2, cache.Count);
        cache.Dispose();
        Assert.Empty(recorder.Live);
    }

    [Fact]
    public void ARefusedCaptureLaunchesEveryStepDirectlyFromThenOn()
    {
        var recorder = new Recorder { RefuseCaptures = true };
        using var cache = new KernelGraphCache(recorder);
        var runs = Enumerable.Range(0, 4).Select(_ => cache.Run(Step(0))).ToList();
        Assert.All(runs, r => Assert.Equal(GraphRun.Direct, r));
        Assert.Equal(4, recorder.Calls.Count(c => c == "launch A"));
        Assert.Contains("CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", cache.DisabledReason);
    }
}
