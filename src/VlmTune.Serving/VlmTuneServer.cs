using System.Net;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json.Serialization;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using VlmTune.Inference;

namespace VlmTune.Serving;

/// <summary>
/// What the endpoints share: the options, the chat client over the engine, the image sources, the in-flight count,
/// the gate of large bodies and the shutdown state.
/// </summary>
public sealed class ServingState(ServerOptions options, InternVLChatClient client, ImageSources images)
{
    /// <summary>Bodies above this (or of unknown length) are admitted before they are read, through <see cref="LargeBodies"/>.</summary>
    public const long LargeBodyBytes = 1024 * 1024;

    private int _inFlight;
    private readonly CancellationTokenSource _shutdownGraceOver = new();
    private volatile bool _stopping;

    public ServerOptions Options { get; } = options;
    public InternVLChatClient Client { get; } = client;
    public ImageSources Images { get; } = images;
    /// <summary>What GET /metrics shows; its series exist from the start, so the first scrape already lists them at 0.</summary>
    public ServerMetrics Metrics { get; } = new(client.Engine, client.ModelIds);
    /// <summary>The base model's id.</summary>
    public string ModelId => Client.Options.ModelId;
    /// <summary>The adapters served beside the base; null when the server serves one model.</summary>
    public ServedAdapters? Adapters => Client.Engine.Adapters;
    public DateTimeOffset Started { get; } = DateTimeOffset.UtcNow;
    public int InFlight => Volatile.Read(ref _inFlight);

    /// <summary>Large bodies being read and parsed now (<see cref="ServerOptions.MaxConcurrentLargeBodies"/> at most).</summary>
    public SemaphoreSlim LargeBodies { get; } = new(options.MaxConcurrentLargeBodies, options.MaxConcurrentLargeBodies);

    /// <summary>Whether the server is shutting down (new requests get 503).</summary>
    public bool Stopping => _stopping;

    /// <summary>Cancelled once the shutdown grace has passed: what is still running then is ended.</summary>
    public CancellationToken ShutdownGraceOver => _shutdownGraceOver.Token;

    internal void BeginShutdown()
    {
        _stopping = true;
        _shutdownGraceOver.CancelAfter(TimeSpan.FromSeconds(Options.ShutdownGraceSeconds));
    }

    internal static ApiException ShuttingDown() =>
        new(503, "The server is shutting down; retry on another instance.", null, "server_shutting_down");

    /// <summary>Takes a request slot, or throws 429 when <see cref="ServerOptions.MaxConcurrentRequests"/> are in flight.</summary>
    public IDisposable Enter()
    {
        if (_stopping) throw ShuttingDown();
        if (Interlocked.Increment(ref _inFlight) > Options.MaxConcurrentRequests)
        {
            Interlocked.Decrement(ref _inFlight);
            throw new ApiException(429, $"Too many requests in flight (limit {Options.MaxConcurrentRequests}); retry shortly.", null, "rate_limit_exceeded");
        }
        return new Slot(this);
    }

    private sealed class Slot(ServingState state) : IDisposable
    {
        private int _done;
        public void Dispose() { if (Interlocked.Exchange(ref _done, 1) == 0) Interlocked.Decrement(ref state._inFlight); }
    }
}

/// <summary>
/// The host takes no process signals (ASP.NET Core's console lifetime would swallow SIGTERM and SIGINT): whoever
/// runs the server stops it — <c>vlmtune serve</c> on those signals, tests when they are done.
/// </summary>
internal sealed class ExternallyStoppedLifetime : IHostLifetime
{
    public Task WaitForStartAsync(CancellationToken cancellationToken) => Task.CompletedTask;
    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;
}

/// <summary>
/// The OpenAI-compatible HTTP server over an <see cref="InternVLChatClient"/>: Kestrel with minimal APIs, one
/// endpoint group per static class, errors in OpenAI's shape, Bearer auth when an API key is set.
/// </summary>
public static class VlmTuneServer
{
    /// <summary>Builds (does not start) the app. The caller keeps owning the client, its engine and model.</summary>
    public static WebApplication Build(ServerOptions options, InternVLChatClient client, Action<ILoggingBuilder>? logging = null)
    {
        var problems = options.Validate().ToList();
        if (problems.Count > 0) throw new VlmTuneException("Server options: " + string.Join(" ", problems));
        var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions { Args = [] });
        builder.Logging.ClearProviders();
        if (logging is null)
        {
            builder.Logging.AddSimpleConsole(o => { o.SingleLine = true; }).SetMinimumLevel(LogLevel.Warning);
            // A failed start (port in use) is rethrown to the caller, who says it in one line; the host would add a stack trace.
            builder.Logging.AddFilter("Microsoft.Extensions.Hosting.Internal.Host", LogLevel.Critical);
        }
        else logging(builder.Logging);
        builder.Services.AddSingleton<IHostLifetime, ExternallyStoppedLifetime>();
        // After the grace, streams end with an error event within moments; this is the last resort that aborts connections.
        builder.Services.Configure<HostOptions>(h => h.ShutdownTimeout = TimeSpan.FromSeconds(options.ShutdownGraceSeconds + 3));
        builder.WebHost.ConfigureKestrel(k =>
        {
            k.AddServerHeader = false;
            k.Limits.MaxRequestBodySize = options.MaxRequestBytes;
            k.Limits.MaxRequestHeadersTotalSize = 64 * 1024;
            k.Limits.RequestHeadersTimeout = TimeSpan.FromSeconds(30);
            k.Limits.MaxConcurrentConnections = options.MaxConnections;
            k.Limits.MaxConcurrentUpgradedConnections = 0;
            if (options.Host == "localhost") k.ListenLocalhost(options.Port);
            else if (IPAddress.TryParse(options.Host, out var ip)) k.Listen(ip, options.Port);
            else throw new VlmTuneException($"--host '{options.Host}' must be an IP address (e.g. 127.0.0.1, 0.0.0.0) or localhost.");
        });
        var fetcher = new RemoteImageFetcher(options);
        var state = new ServingState(options, client, new ImageSources(options, fetcher));
        builder.Services.AddSingleton(fetcher);
        builder.Services.AddSingleton(state);

        var app = builder.Build();
        app.Lifetime.ApplicationStopping.Register(state.BeginShutdown);
        app.Lifetime.ApplicationStopped.Register(fetcher.Dispose);
        app.Use(MetricsApi.CountChatRequests);
        app.Use(ErrorsAsOpenAi);
        app.Use(RequireAllowedHost(options));
        if (options.ApiKey is { } key) app.Use(RequireApiKey(key));
        app.Use(RequireJsonBody);
        app.MapHealthApi();
        app.MapModelsApi();
        app.MapAdaptersApi();
        app.MapChatCompletionsApi();
        app.MapMetricsApi();
        app.MapChatPage();
        app.MapFallback(() => Results.Json(new ApiException(404, "Unknown endpoint.", null, "not_found").Body, statusCode: 404));
        return app;
    }

    /// <summary>
    /// The engine and chat client the server's options describe, over a loaded model (the caller disposes the engine);
    /// the engine decodes with the switches the model was loaded with (<see cref="InternVLChat.Switches"/>). Named
    /// adapters (<see cref="ServerOptions.Adapters"/>) are loaded here, all checked before any is served; an error
    /// names the <c>--adapter</c> value.
    /// </summary>
    public static InternVLChatClient CreateChatClient(InternVLChat chat, ServerOptions options)
    {
        var adapters = options.ServesAdapters ? LoadAdapters(chat, options) : null;
        InferenceEngine engine;
        try
        {
            engine = new InferenceEngine(chat.Model, chat.Tokenizer.ImgContextId, new EngineOptions
            {
                MaxBatch = options.MaxBatch,
                MaxCacheTokens = options.KvCacheTokens,
                ImageCacheBytes = options.ImageCacheMib * (1L << 20),
                PrefixCacheBytes = options.PrefixCacheMib * (1L << 20),
                MaxPrefillTokens = options.MaxPrefillTokens,
                MaxWaitingSteps = options.MaxWaitingSteps,
                MaxQueue = options.MaxConcurrentRequests,
                MaxContextTokens = options.MaxContextTokens,
            }.With(chat.Switches), adapters);
        }
        catch
        {
            adapters?.Dispose();
            throw;
        }
        return new InternVLChatClient(chat, engine, new ChatClientOptions
        {
            ModelId = options.BaseModelId,
            DefaultMaxNewTokens = options.DefaultMaxTokens,
            MaxNewTokensLimit = options.MaxTokens,
            MaxImagesPerRequest = options.MaxImagesPerRequest,
            MaxTilesPerRequest = options.MaxTilesPerRequest,
            ImageLimits = new Vision.ImageLimits { MaxPixels = options.MaxImagePixels },
        });
    }

    private static ServedAdapters LoadAdapters(InternVLChat chat, ServerOptions options)
    {
        var adapters = new ServedAdapters(chat.Model, options.BaseModelId);
        var problems = new List<string>();
        foreach (var (name, path) in options.NamedAdapters)
        {
            try { adapters.Load(name, path); }
            catch (VlmTuneException e) { problems.Add($"--adapter {name}={path}: {e.Message}"); }
        }
        if (problems.Count == 0) return adapters;
        adapters.Dispose();
        throw new VlmTuneException(string.Join("\n", problems));
    }

    /// <summary>The model folder's name (e.g. InternVL2-2B), what clients put in "model".</summary>
    public static string DefaultModelId(string modelDir) =>
        Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(modelDir))) is { Length: > 0 } name ? name : "internvl2";

    /// <summary>The address the started app listens on (e.g. http://127.0.0.1:41234 when port 0 was asked for).</summary>
    public static Uri Address(WebApplication app) =>
        new(app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First());

    private static async Task ErrorsAsOpenAi(HttpContext context, RequestDelegate next)
    {
        try
        {
            await next(context);
        }
        catch (ApiException e) when (!context.Response.HasStarted)
        {
            await WriteError(context, e);
        }
        catch (BadHttpRequestException e) when (!context.Response.HasStarted)
        {
            await WriteError(context, e.StatusCode == StatusCodes.Status413PayloadTooLarge
                ? new ApiException(413, "The request body is larger than this server accepts.", null, "request_too_large")
                : new ApiException(e.StatusCode, "The request could not be read."));
        }
        catch (Exception e) when (context.RequestAborted.IsCancellationRequested && e is OperationCanceledException or IOException)
        {
            // The client went away (mid-upload or mid-answer); nothing to answer, nothing to log.
        }
        catch (Exception e) when (!context.Response.HasStarted)
        {
            context.RequestServices.GetRequiredService<ILoggerFactory>().CreateLogger("VlmTune.Serving").LogError(e, "Request failed");
            await WriteError(context, new ApiException(500, "The server failed to process the request.", null, "internal_error"));
        }
    }

    internal static Task WriteError(HttpContext context, ApiException e)
    {
        context.Features.Get<ChatRequestRecord>()?.Count("error", e.Status);
        context.Response.StatusCode = e.Status;
        if (e.Status == 401) context.Response.Headers.WWWAuthenticate = "Bearer";
        return context.Response.WriteAsJsonAsync(e.Body);
    }

    /// <summary>
    /// DNS rebinding: a web page whose name the attacker re-points at 127.0.0.1 reaches a loopback server as same-origin,
    /// but its requests carry the attacker's name in Host. On loopback only loopback names pass, plus --allowed-hosts
    /// (matched as ASP.NET Core's host filtering matches them).
    /// </summary>
    private static Func<HttpContext, RequestDelegate, Task> RequireAllowedHost(ServerOptions options)
    {
        var patterns = options.AllowedHosts.Select(h => new Microsoft.Extensions.Primitives.StringSegment(h.Trim())).ToList();
        bool any = patterns.Any(p => p.Equals("*", StringComparison.Ordinal)) || (!options.ListensOnLoopback && patterns.Count == 0);
        return (context, next) =>
        {
            if (any) return next(context);
            var host = context.Request.Host;
            // Browsers always send Host; a request without one is no rebinding attack.
            if (!host.HasValue || IsLoopbackName(host.Host) || (patterns.Count > 0 && HostString.MatchesAny(host.Host, patterns))) return next(context);
            throw new ApiException(400, $"The Host '{ModelsApi.Clip(host.Host)}' is not accepted by this server (DNS rebinding protection); its operator can allow it with --allowed-hosts.", null, "host_not_allowed");
        };
    }

    internal static bool IsLoopbackName(string host)
    {
        if (host.Equals("localhost", StringComparison.OrdinalIgnoreCase)) return true;
        var literal = host.StartsWith('[') && host.EndsWith(']') ? host[1..^1] : host;
        return IPAddress.TryParse(literal, out var ip) && IPAddress.IsLoopback(ip.IsIPv4MappedToIPv6 ? ip.MapToIPv4() : ip);
    }

    /// <summary>
    /// CSRF: a page on any site may POST text/plain (or a form) here without a CORS preflight, and without an API key
    /// that would run a generation. application/json needs a preflight, which this server never grants.
    /// </summary>
    private static Task RequireJsonBody(HttpContext context, RequestDelegate next)
    {
        var method = context.Request.Method;
        if (!(HttpMethods.IsPost(method) || HttpMethods.IsPut(method) || HttpMethods.IsPatch(method))) return next(context);
        bool json = Microsoft.Net.Http.Headers.MediaTypeHeaderValue.TryParse(context.Request.ContentType, out var type)
            && type.MediaType.Equals("application/json", StringComparison.OrdinalIgnoreCase)
            && (!type.Charset.HasValue || type.Charset.Equals("utf-8", StringComparison.OrdinalIgnoreCase));
        if (json) return next(context);
        throw new ApiException(415, "The request body must be JSON sent as 'Content-Type: application/json' (UTF-8).", null, "unsupported_media_type");
    }

    /// <summary>Bearer auth on everything but /health and the static chat page (which holds no data and sends the key itself).</summary>
    private static Func<HttpContext, RequestDelegate, Task> RequireApiKey(string key)
    {
        var expected = SHA256.HashData(Encoding.UTF8.GetBytes(key));
        return (context, next) =>
        {
            var path = context.Request.Path.Value ?? "/";
            bool open = path == "/health" || (HttpMethods.IsGet(context.Request.Method) && ChatPage.Paths.Contains(path));
            if (open) return next(context);
            var header = context.Request.Headers.Authorization.ToString();
            const string scheme = "Bearer ";
            bool ok = header.StartsWith(scheme, StringComparison.OrdinalIgnoreCase)
                && CryptographicOperations.FixedTimeEquals(SHA256.HashData(Encoding.UTF8.GetBytes(header[scheme.Length..].Trim())), expected);
            if (ok) return next(context);
            throw new ApiException(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.", null, "invalid_api_key");
        };
    }
}

public static class HealthApi
{
    public static IEndpointRouteBuilder MapHealthApi(this IEndpointRouteBuilder app)
    {
        app.MapGet("/health", (ServingState s) =>
        {
            var stats = s.Client.Engine.Stats;
            return TypedResults.Ok(new { status = "ok", running = stats.Running, queued = stats.Queued, in_flight = s.InFlight });
        });
        return app;
    }
}

/// <summary>A model object of <c>/v1/models</c>; an adapter's names the base model it runs on (<c>parent</c>, as vLLM's LoRA models).</summary>
public sealed record ModelCard(
    [property: JsonPropertyName("id")] string Id,
    [property: JsonPropertyName("created")] long Created,
    [property: JsonPropertyName("parent"), JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] string? Parent)
{
    [JsonPropertyName("object")] public string Object => "model";
    [JsonPropertyName("owned_by")] public string OwnedBy => "vlmtune";
}

public static class ModelsApi
{
    public static IEndpointRouteBuilder MapModelsApi(this IEndpointRouteBuilder app)
    {
        app.MapGet("/v1/models", (ServingState s) => TypedResults.Ok(new
        {
            @object = "list",
            data = Models(s),
        }));
        app.MapGet("/v1/models/{id}", (string id, ServingState s) => Card(s, id, Resolve(s, id)));
        return app;
    }

    /// <summary>The base model, then every served adapter.</summary>
    internal static IEnumerable<ModelCard> Models(ServingState s) =>
        (s.Adapters?.All ?? []).Select(a => Card(s, a.Name, a)).Prepend(Card(s, s.ModelId, null));

    internal static ModelCard Card(ServingState s, string id, ServedAdapter? adapter) => adapter is null
        ? new ModelCard(id, s.Started.ToUnixTimeSeconds(), null)
        : new ModelCard(adapter.Name, adapter.Loaded.ToUnixTimeSeconds(), s.ModelId);

    /// <summary>The adapter a request's <c>model</c> names (null: the base model); 404 <c>model_not_found</c>, naming it, for any other.</summary>
    internal static ServedAdapter? Resolve(ServingState s, string model)
    {
        try { return s.Client.ResolveModel(model); }
        catch (UnknownModelException e) { throw NotFound(e); }
    }

    internal static ApiException NotFound(UnknownModelException e) => new(404, e.Message, "model", "model_not_found");

    internal static string Clip(string s) => s.Length <= 64 ? s : s[..64] + "…";
}
