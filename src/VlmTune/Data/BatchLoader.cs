using System.Threading.Channels;

namespace VlmTune.Data;

/// <summary>
/// Builds micro-batches ahead of the trainer on <c>dataloader_num_workers</c> background workers (image decoding and
/// tiling, tokenisation, collation) and hands them over in iteration order through a bounded queue.
/// </summary>
public sealed class BatchLoader : IDisposable
{
    private readonly Func<long, TrainBatch> _build;
    private readonly Channel<Task<TrainBatch>>? _queue;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task? _producer;
    private long _next;

    /// <param name="packTokens">Pack each micro-batch's samples into rows of at most this many tokens; null: one sample per row.</param>
    /// <param name="padMultiple">Each batch's row length is rounded up to a multiple of this (TrainConfig.pad_to_multiple_of).</param>
    public BatchLoader(TrainDataset dataset, BatchPlan plan, SampleEncoder encoder, int padId, long firstIteration, long endIteration, int workers, int? packTokens = null, int padMultiple = 1)
    {
        _next = firstIteration;
        _build = iteration =>
        {
            var (_, indices) = plan.Batch(iteration);
            var encoded = new List<EncodedSample>();
            int skipped = 0;
            try
            {
                foreach (var i in indices)
                {
                    if (encoder.Encode(dataset.Samples[(int)i]) is { } e) encoded.Add(e);
                    else skipped++;
                }
                return TrainBatch.Collate(iteration, encoded, skipped, padId, packTokens, padMultiple);
            }
            finally
            {
                foreach (var e in encoded) e.Dispose();
            }
        };
        if (workers <= 0) return;

        _queue = Channel.CreateBounded<Task<TrainBatch>>(new BoundedChannelOptions(Math.Max(2, workers * 2)) { SingleReader = true, SingleWriter = true });
        var slots = new SemaphoreSlim(workers);
        var token = _stop.Token;
        _producer = Task.Run(async () =>
        {
            try
            {
                for (long it = firstIteration; it < endIteration; it++)
                {
                    await slots.WaitAsync(token);
                    long current = it;
                    var job = Task.Run(() =>
                    {
                        try { return _build(current); }
                        finally { slots.Release(); }
                    });
                    await _queue.Writer.WriteAsync(job, token);
                }
                _queue.Writer.TryComplete();
            }
            catch (OperationCanceledException) { _queue.Writer.TryComplete(); }
            catch (Exception e) { _queue.Writer.TryComplete(e); }
        });
    }

    /// <summary>The next iteration's batch (blocks until a worker has it ready).</summary>
    public TrainBatch Next()
    {
        if (_queue is null) return _build(_next++);
        var job = _queue.Reader.ReadAsync().AsTask().GetAwaiter().GetResult();
        var batch = job.GetAwaiter().GetResult();
        _next++;
        return batch;
    }

    public void Dispose()
    {
        _stop.Cancel();
        if (_queue is null) return;
        try { _producer?.Wait(TimeSpan.FromSeconds(30)); } catch (AggregateException) { }
        while (_queue.Reader.TryRead(out var job))
        {
            try { job.GetAwaiter().GetResult().Dispose(); } catch (Exception) { }
        }
    }
}
