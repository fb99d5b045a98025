using System.Collections.Concurrent;
using System.Diagnostics;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.DependencyInjection;
using Prometheus;
using VlmTune.Inference;

namespace VlmTune.Serving;

/// <summary>
/// The server's Prometheus metrics, served at <c>GET /metrics</c> in the text exposition format 0.0.4 through
/// prometheus-net. Each server has a registry of its own, so servers in one process (tests) never mix. Per-request
/// series carry the label <c>model</c>: the served model id the request named ("" before one is known, so that
/// arbitrary names sent by clients never become series). Engine-wide gauges and the decode-step histogram are read
/// from the engine when scraped; the engine reports a request's tokens through <see cref="IGenerationObserver"/>.
/// </summary>
public sealed class ServerMetrics
{
    /// <summary>What Prometheus asks for and prometheus-net writes: the text format, version 0.0.4.</summary>
    public const string ContentType = "text/plain; version=0.0.4; charset=utf-8";

    // vLLM's buckets (vllm/v1/metrics/loggers.py): time to first token as they are; time per output token and request
    // latency with finer ones below theirs, since one sequence decodes a token in about 3 ms on an H100 (the tiny test
    // model in under 2 ms on a CPU), where vLLM's first bucket (10 ms) would hold every token, and short answers take
    // well under its first 0.3 s.
    internal static readonly double[] TimeToFirstTokenBuckets =
        [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0];
    internal static readonly double[] TimePerOutputTokenBuckets =
        [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
    internal static readonly double[] RequestLatencyBuckets =
        [0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0];

    private readonly CollectorRegistry _registry = Metrics.NewCustomRegistry();
    private readonly InferenceEngine _engine;
    private readonly Counter _requests;
    private readonly Counter _promptTokens, _generationTokens, _tiles;
    private readonly Histogram _timeToFirstToken, _timePerOutputToken, _e2eLatency, _queueTime;
    private readonly Histogram _stepBatchSize;
    private readonly Gauge _inFlight;
    private readonly long[] _stepsSeen;
    private readonly ConcurrentDictionary<string, ModelSeries> _models = new();

    public ServerMetrics(InferenceEngine engine, IEnumerable<string> modelIds)
    {
        _engine = engine;
        var f = Metrics.WithCustomRegistry(_registry);
        // Exemplars appear only in OpenMetrics, which this endpoint does not offer; skip looking for a trace on every token.
        f.ExemplarBehavior = ExemplarBehavior.NoExemplars();
        string[] model = ["model"];

        _requests = f.CreateCounter("vlmtune_requests_total",
            "Chat completion requests ended, by finish_reason (stop, length, cancelled: the client went away, error) and the HTTP status answered (499: the client closed the connection).",
            new CounterConfiguration { LabelNames = ["model", "finish_reason", "status"] });
        _promptTokens = f.CreateCounter("vlmtune_prompt_tokens_total", "Prompt tokens of the requests whose prefill ended (image context tokens and tokens served from the prefix cache included).", model);
        _generationTokens = f.CreateCounter("vlmtune_generation_tokens_total", "Tokens generated (stop ids excluded; tokens of cancelled requests included).", model);
        _tiles = f.CreateCounter("vlmtune_image_tiles_total", "Image tiles (448x448, thumbnails included) of the requests' images, those whose features came from the image-feature cache included.", model);
        _timeToFirstToken = f.CreateHistogram("vlmtune_time_to_first_token_seconds", "From the request's body read to its first generated token.",
            new HistogramConfiguration { LabelNames = model, Buckets = TimeToFirstTokenBuckets });
        _timePerOutputToken = f.CreateHistogram("vlmtune_time_per_output_token_seconds", "Time between two consecutive generated tokens of a request.",
            new HistogramConfiguration { LabelNames = model, Buckets = TimePerOutputTokenBuckets });
        _e2eLatency = f.CreateHistogram("vlmtune_e2e_request_latency_seconds", "From the request's body read to the end of its answer (requests that finished with stop or length).",
            new HistogramConfiguration { LabelNames = model, Buckets = RequestLatencyBuckets });
        _queueTime = f.CreateHistogram("vlmtune_request_queue_time_seconds", "From a request's submission to the engine to its admission into the batch.",
            new HistogramConfiguration { LabelNames = model, Buckets = TimeToFirstTokenBuckets });

        var running = f.CreateGauge("vlmtune_requests_running", "Requests in the engine's batch (prefilling or decoding).");
        var waiting = f.CreateGauge("vlmtune_requests_waiting", "Requests waiting in the engine's queue.");
        _inFlight = f.CreateGauge("vlmtune_http_requests_in_flight", "Chat completion requests being handled, from their arrival to their last byte.");
        var batchSize = f.CreateGauge("vlmtune_decode_batch_size", "Sequences in the engine's latest decode step; 0 while idle.");
        var kvUsed = f.CreateGauge("vlmtune_kv_cache_used_tokens", "KV-cache token slots (rows x columns) held by the running sequences' caches.");
        var kvCapacity = f.CreateGauge("vlmtune_kv_cache_capacity_tokens", "The engine's KV-cache budget in token slots (ServerOptions.KvCacheTokens).");
        var kvUsage = f.CreateGauge("vlmtune_kv_cache_usage_ratio", "vlmtune_kv_cache_used_tokens / vlmtune_kv_cache_capacity_tokens (0 to 1).");
        var imageCacheHits = f.CreateCounter("vlmtune_image_cache_hits_total", "Images whose features came from the engine's image-feature cache (the vision encoder did not run for them).");
        var imageCacheMisses = f.CreateCounter("vlmtune_image_cache_misses_total", "Images the vision encoder ran for while the image-feature cache is on.");
        var imageCacheBytes = f.CreateGauge("vlmtune_image_cache_bytes", "Bytes of image features the engine's image-feature cache holds.");
        var imageCacheCapacity = f.CreateGauge("vlmtune_image_cache_capacity_bytes", "The image-feature cache's budget in bytes (--image-cache-mib); 0: off.");
        var prefixHits = f.CreateCounter("vlmtune_prefix_cache_hits_total", "Requests that reused at least one cached 64-token prompt block.");
        var prefixMisses = f.CreateCounter("vlmtune_prefix_cache_misses_total", "Requests looked up in the prefix cache that reused none.");
        var prefixReused = f.CreateCounter("vlmtune_prefix_cache_reused_tokens_total", "Prompt tokens whose keys and values came from the prefix cache instead of a prefill.");
        var prefixBytes = f.CreateGauge("vlmtune_prefix_cache_bytes", "Bytes of keys and values the engine's prefix cache holds.");
        var prefixCapacity = f.CreateGauge("vlmtune_prefix_cache_capacity_bytes", "The prefix cache's budget in bytes (--prefix-cache-mib); 0: off.");
        var prefillPasses = f.CreateCounter("vlmtune_prefill_passes_total", "Prefill passes the engine ran (several prompts together, a chunk of a long prompt, or a long prompt alone).");
        int maxBatch = engine.Options.MaxBatch;
        _stepBatchSize = f.CreateHistogram("vlmtune_decode_step_batch_size", "Sequences stepped by each decode step of the engine.",
            new HistogramConfiguration { Buckets = BatchBuckets(maxBatch) });
        _stepsSeen = new long[maxBatch + 1];

        _registry.AddBeforeCollectCallback(() =>
        {
            var stats = engine.Stats;
            running.Set(stats.Running);
            waiting.Set(stats.Queued);
            batchSize.Set(stats.Decoding);
            long capacity = engine.Options.MaxCacheTokens;
            kvUsed.Set(stats.CacheSlots);
            kvCapacity.Set(capacity);
            kvUsage.Set((double)stats.CacheSlots / capacity);
            var images = engine.ImageCache;
            imageCacheHits.IncTo(images.Hits);
            imageCacheMisses.IncTo(images.Misses);
            imageCacheBytes.Set(images.Bytes);
            imageCacheCapacity.Set(images.CapacityBytes);
            var prefixes = engine.PrefixCache;
            prefixHits.IncTo(prefixes.Hits);
            prefixMisses.IncTo(prefixes.Misses);
            prefixReused.IncTo(prefixes.ReusedTokens);
            prefixBytes.Set(prefixes.Bytes);
            prefixCapacity.Set(prefixes.CapacityBytes);
            prefillPasses.IncTo(engine.PrefillPasses);
            ObserveNewSteps();
        });
        // Known series start at 0, so that rate() and increase() see their first events.
        foreach (var id in modelIds)
        {
            For(id);
            foreach (var (reason, status) in new[] { ("stop", 200), ("length", 200), ("cancelled", 499) }) CountRequest(id, reason, status, by: 0);
        }
    }

    /// <summary>Writes every metric in the text format.</summary>
    public Task WriteAsync(Stream destination, CancellationToken cancellation) =>
        _registry.CollectAndExportAsTextAsync(destination, ExpositionFormat.PrometheusText, cancellation);

    /// <summary>A new request's record: its line in vlmtune_requests_total and the engine's observer of it.</summary>
    internal ChatRequestRecord NewRequest() => new(this);

    internal ModelSeries For(string model) => _models.GetOrAdd(model, m => new ModelSeries(
        _promptTokens.WithLabels(m), _generationTokens.WithLabels(m), _tiles.WithLabels(m),
        _timeToFirstToken.WithLabels(m), _timePerOutputToken.WithLabels(m), _e2eLatency.WithLabels(m), _queueTime.WithLabels(m)));

    /// <summary>Chat completion requests being handled now; the middleware that counts them holds one each.</summary>
    internal IDisposable TrackInFlight() => _inFlight.TrackInProgress();

    internal void CountRequest(string model, string finishReason, int status, int by = 1) =>
        _requests.WithLabels(model, finishReason, status.ToString(System.Globalization.CultureInfo.InvariantCulture)).Inc(by);

    /// <summary>The engine counts its steps by batch size; the histogram takes the steps run since the last scrape.</summary>
    private void ObserveNewSteps()
    {
        var counts = _engine.DecodeStepsByBatchSize();
        lock (_stepsSeen)
        {
            for (int n = 0; n < counts.Length; n++)
            {
                long added = counts[n] - _stepsSeen[n];
                if (added > 0) _stepBatchSize.Observe(n, added);
                _stepsSeen[n] = counts[n];
            }
        }
    }

    /// <summary>1, 2, 4, … up to the largest batch, which is a bucket of its own.</summary>
    private static double[] BatchBuckets(int maxBatch)
    {
        var buckets = new List<double>();
        for (long b = 1; b < maxBatch; b *= 2) buckets.Add(b);
        buckets.Add(maxBatch);
        return [.. buckets];
    }

    internal sealed record ModelSeries(Counter.Child PromptTokens, Counter.Child GenerationTokens, Counter.Child Tiles,
        Histogram.Child TimeToFirstToken, Histogram.Child TimePerOutputToken, Histogram.Child E2eLatency, Histogram.Child QueueTime);
}

/// <summary>
/// One chat completion request as the metrics see it: counted once in vlmtune_requests_total — always before its last
/// byte is sent, so a client that has read its answer (or error) finds it counted — and observed by the engine while
/// it runs. Its timestamps come from the same clock; the token ones are taken on the engine's loop thread.
/// </summary>
internal sealed class ChatRequestRecord(ServerMetrics metrics) : IGenerationObserver
{
    private int _counted;
    private ServerMetrics.ModelSeries? _series;
    private long _received, _submitted, _previousToken;

    /// <summary>The served model id the request named; "" until then.</summary>
    public string Model { get; private set; } = "";

    /// <summary>The request names <paramref name="model"/>, one this server serves.</summary>
    public void Named(string model)
    {
        Model = model;
        _series = metrics.For(model);
    }

    /// <summary>The whole body is in: the start of the request's latencies (a client's slow upload is not the server's).</summary>
    public void Received() => _received = Stopwatch.GetTimestamp();

    /// <summary>The request goes to the engine now.</summary>
    public void Submitted() => _submitted = Stopwatch.GetTimestamp();

    /// <summary>Counts the request once, however many places see it end; a completed answer's latency is observed too.</summary>
    public void Count(string finishReason, int status)
    {
        if (Interlocked.Exchange(ref _counted, 1) != 0) return;
        metrics.CountRequest(Model, finishReason, status);
        if (finishReason is "stop" or "length" && _received != 0) _series?.E2eLatency.Observe(Stopwatch.GetElapsedTime(_received).TotalSeconds);
    }

    /// <summary>What a request that ended without being counted was: cut by its client, or an error.</summary>
    public void CountUnaccounted(HttpContext context)
    {
        if (context.RequestAborted.IsCancellationRequested) Count("cancelled", 499);
        else Count("error", context.Response.StatusCode >= 400 ? context.Response.StatusCode : 500);
    }

    void IGenerationObserver.Admitted()
    {
        if (_submitted != 0) _series?.QueueTime.Observe(Stopwatch.GetElapsedTime(_submitted).TotalSeconds);
    }

    void IGenerationObserver.TilesEncoded(int tiles) => _series?.Tiles.Inc(tiles);

    void IGenerationObserver.Prefilled(int tokens) => _series?.PromptTokens.Inc(tokens);

    void IGenerationObserver.Token()
    {
        if (_series is not { } series) return;
        long now = Stopwatch.GetTimestamp();
        series.GenerationTokens.Inc();
        if (_previousToken == 0) { if (_received != 0) series.TimeToFirstToken.Observe(Stopwatch.GetElapsedTime(_received, now).TotalSeconds); }
        else series.TimePerOutputToken.Observe(Stopwatch.GetElapsedTime(_previousToken, now).TotalSeconds);
        _previousToken = now;
    }
}

/// <summary><c>GET /metrics</c>: Prometheus' text format. With --api-key it needs the key, as every other endpoint but /health.</summary>
public static class MetricsApi
{
    public static IEndpointRouteBuilder MapMetricsApi(this IEndpointRouteBuilder app)
    {
        app.MapGet("/metrics", async (HttpContext context, ServingState state) =>
        {
            // Collected whole before anything is sent: a failure is a clean 500, never half an exposition.
            using var buffer = new MemoryStream();
            await state.Metrics.WriteAsync(buffer, context.RequestAborted);
            context.Response.ContentType = ServerMetrics.ContentType;
            context.Response.Headers.CacheControl = "no-store";
            context.Response.ContentLength = buffer.Length;
            buffer.Position = 0;
            await buffer.CopyToAsync(context.Response.Body, context.RequestAborted);
        });
        return app;
    }

    /// <summary>
    /// Gives each chat completion request its <see cref="ChatRequestRecord"/> (an HTTP feature) and counts what ends
    /// uncounted: a request cut by its client, a method not allowed. Outermost, so that it sees every request.
    /// </summary>
    internal static async Task CountChatRequests(HttpContext context, RequestDelegate next)
    {
        if (context.Request.Path != ChatCompletionsApi.Path) { await next(context); return; }
        var metrics = context.RequestServices.GetRequiredService<ServingState>().Metrics;
        var record = metrics.NewRequest();
        context.Features.Set(record);
        using var inFlight = metrics.TrackInFlight();
        try { await next(context); }
        finally { record.CountUnaccounted(context); }
    }
}
