using VlmTune.Inference;

namespace VlmTune.Serving;

/// <summary>
/// Everything <c>vlmtune serve</c> can be told, bound from configuration (section <c>Serve</c>: command-line flags,
/// then <c>VLMTUNE_Serve__*</c> environment variables). Defaults are safe: loopback only, no local or remote image
/// fetching, bounded sizes everywhere.
/// </summary>
public sealed record ServerOptions
{
    public const string Section = "Serve";

    public string ModelDir { get; init; } = "";
    /// <summary>
    /// One adapter merged into the loaded weights (a bare <c>--adapter PATH</c>): the server serves the adapted model
    /// under <see cref="ModelId"/>, at the base model's cost.
    /// </summary>
    public string? AdapterDir { get; init; }
    /// <summary>
    /// Adapters served beside the base model, as <c>NAME=PATH</c> (<c>--adapter NAME=PATH</c>, repeatable): each NAME
    /// is a model id clients send; the base stays unmerged and requests for any of them share one decode batch.
    /// </summary>
    public string[] Adapters { get; init; } = [];
    /// <summary>
    /// Folder under which <c>POST /v1/adapters</c> may load adapters at run time (<c>DELETE /v1/adapters/{name}</c>
    /// unloads them); null: the admin routes are off. Needs <see cref="ApiKey"/>.
    /// </summary>
    public string? AllowAdapterLoading { get; init; }
    /// <summary>The model name clients send; default: the model folder's name.</summary>
    public string? ModelId { get; init; }
    public string Host { get; init; } = "127.0.0.1";
    public int Port { get; init; } = 23333;
    /// <summary>When set, every endpoint but /health (and the static page) needs <c>Authorization: Bearer KEY</c>.</summary>
    public string? ApiKey { get; init; }
    public string Device { get; init; } = "cpu";

    public int MaxBatch { get; init; } = 32;
    /// <summary>Most tiles per image (thumbnail excluded), as max_num of dynamic_preprocess.</summary>
    /// <summary>Most tiles per image, thumbnail excluded; null: the model's max_dynamic_patch.</summary>
    public int? MaxTiles { get; init; }
    public int MaxTilesPerRequest { get; init; } = 64;
    public int MaxImagesPerRequest { get; init; } = 8;
    public long MaxImagePixels { get; init; } = 50_000_000;
    public long MaxImageBytes { get; init; } = 20 * 1024 * 1024;
    /// <summary>
    /// Largest request body, refused (413) before it is read: 64 MiB holds two images of <see cref="MaxImageBytes"/>
    /// as base64 data: URLs (4/3 of their size) with room to spare; OpenAI's own limit is 50 MB.
    /// </summary>
    public long MaxRequestBytes { get; init; } = 64 * 1024 * 1024;
    /// <summary>
    /// Bodies above 1 MiB (or of unknown length) read and parsed at once; the others wait, admitted but unread, so
    /// concurrent large bodies cost at most this many times their transient memory (≈ 4× the body).
    /// </summary>
    public int MaxConcurrentLargeBodies { get; init; } = 4;
    /// <summary>Open TCP connections Kestrel accepts; beyond it new connections are closed at once.</summary>
    public long MaxConnections { get; init; } = 1000;
    /// <summary>Largest max_tokens a request may ask for (named for the configuration key; the client's <c>MaxNewTokensLimit</c>).</summary>
    public int MaxTokens { get; init; } = 4096;
    /// <summary>max_tokens of a request that gives none (the client's <c>DefaultMaxNewTokens</c>).</summary>
    public int DefaultMaxTokens { get; init; } = 512;
    /// <summary>Requests in flight (running or waiting) before new ones get 429.</summary>
    public int MaxConcurrentRequests { get; init; } = 128;
    public double RequestTimeoutSeconds { get; init; } = 600;
    /// <summary>Longest prompt + max_tokens; null: the engine's default for the model.</summary>
    public int? MaxContextTokens { get; init; }
    /// <summary>KV-cache budget of the engine, in token slots.</summary>
    public long KvCacheTokens { get; init; } = 1 << 18;
    /// <summary>
    /// MiB of the engine's image-feature cache (<c>--image-cache-mib</c>; <see cref="EngineOptions.ImageCacheBytes"/>):
    /// an image sent again skips the vision encoder. Null: 512 on CUDA, 64 on the CPU; 0: off.
    /// </summary>
    public long? ImageCacheMib { get; init; }
    /// <summary>
    /// MiB of the engine's prefix cache (<c>--prefix-cache-mib</c>; <see cref="EngineOptions.PrefixCacheBytes"/>): a
    /// prompt that starts like an earlier one (system prompt, image) prefills only the rest. Null: 2048 on CUDA, 128 on the CPU; 0: off.
    /// </summary>
    public long? PrefixCacheMib { get; init; }
    /// <summary>Tokens one prefill pass computes at most (<c>--max-prefill-tokens</c>; <see cref="EngineOptions.MaxPrefillTokens"/>).</summary>
    public int MaxPrefillTokens { get; init; } = new EngineOptions().MaxPrefillTokens;
    /// <summary>Decode steps a prompt may wait for a fuller prefill pass (<c>--max-waiting-steps</c>; <see cref="EngineOptions.MaxWaitingSteps"/>).</summary>
    public int MaxWaitingSteps { get; init; } = new EngineOptions().MaxWaitingSteps;
    /// <summary>
    /// On SIGTERM/SIGINT: how long in-flight requests may run on before they are ended (a stream with an error event
    /// <c>server_shutting_down</c>, a plain request with 503). New connections are refused from the signal on.
    /// </summary>
    public double ShutdownGraceSeconds { get; init; } = 5;
    /// <summary>
    /// Host header names accepted besides the loopback ones (localhost, 127.x, [::1]), as ASP.NET Core's host filtering
    /// spells them: <c>example.com</c>, <c>*.example.com</c>, or <c>*</c> for any. Empty: only loopback names when
    /// listening on loopback (so a DNS-rebound name cannot reach the server), any name otherwise.
    /// </summary>
    public string[] AllowedHosts { get; init; } = [];

    /// <summary>Folder whose images requests may name by path (file:// URLs or paths); null: none.</summary>
    public string? AllowLocalImages { get; init; }
    /// <summary>Whether http(s) image URLs are fetched at all.</summary>
    public bool AllowRemoteImages { get; init; }
    /// <summary>
    /// Networks (CIDR, e.g. 10.1.0.0/16) remote images may come from although they are loopback, private or link-local.
    /// Everything else of that kind is refused, checked on the address actually connected to.
    /// </summary>
    public string[] AllowedImageNetworks { get; init; } = [];
    public double ImageFetchTimeoutSeconds { get; init; } = 15;
    public int MaxImageRedirects { get; init; } = 3;

    /// <summary>Whether adapters are served beside an unmerged base (named ones, or loading at run time allowed).</summary>
    public bool ServesAdapters => Adapters.Length > 0 || AllowAdapterLoading is not null;

    /// <summary>The base model's id: <see cref="ModelId"/>, or the model folder's name.</summary>
    public string BaseModelId => ModelId ?? VlmTuneServer.DefaultModelId(ModelDir);

    /// <summary>
    /// Whether an <c>--adapter</c> value is <c>NAME=PATH</c>: it has '=' and no '/' before it. Anything else is a path
    /// (a folder whose name has '=' is written <c>./lr=1e-4</c>).
    /// </summary>
    public static bool IsNamedAdapter(string value) => value.IndexOf('=') is var i and >= 0 && !value.AsSpan(0, i).Contains('/');

    /// <summary><see cref="Adapters"/> as names and paths (an entry without '=' has an empty name, which validation refuses).</summary>
    public IEnumerable<(string Name, string Path)> NamedAdapters =>
        Adapters.Select(a => a.IndexOf('=') is var i and >= 0 ? (a[..i], a[(i + 1)..]) : ("", a));

    /// <summary>Whether the server listens on loopback only (127.x, ::1, localhost).</summary>
    public bool ListensOnLoopback => Host == "localhost" || (System.Net.IPAddress.TryParse(Host, out var ip) && System.Net.IPAddress.IsLoopback(ip));

    private IEnumerable<string> AdapterProblems()
    {
        if (AdapterDir is not null && ServesAdapters)
            yield return $"--adapter {AdapterDir} (one adapter merged into the served model) cannot be combined with named adapters or --allow-adapter-loading; name it too: --adapter NAME={AdapterDir}.";
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (name, path) in NamedAdapters)
        {
            if (ModelNames.Problem(name) is { } problem) yield return $"--adapter {name}={path}: {problem}.";
            else if (!seen.Add(name)) yield return $"--adapter {name}: the name is given twice; each adapter needs its own.";
            else if (!string.IsNullOrWhiteSpace(ModelDir) && name == BaseModelId) yield return $"--adapter {name}: that is the base model's id; name the adapter otherwise (or set --model-id).";
            if (path.Length == 0) yield return $"--adapter {name}=: the path is empty.";
            else if (!Directory.Exists(path)) yield return $"--adapter {name}={path}: folder not found.";
        }
        if (AllowAdapterLoading is not null)
        {
            if (!Directory.Exists(AllowAdapterLoading)) yield return $"--allow-adapter-loading {AllowAdapterLoading}: folder not found.";
            if (ApiKey is null) yield return "--allow-adapter-loading needs --api-key: the routes that load and unload adapters are behind it.";
        }
    }

    public IEnumerable<string> Validate()
    {
        if (string.IsNullOrWhiteSpace(ModelDir)) yield return "--model is required.";
        if (Port is < 0 or > 65535) yield return $"--port must be 0..65535 (got {Port}).";
        if (MaxBatch < 1) yield return $"--max-batch must be ≥ 1 (got {MaxBatch}).";
        if (ImageCacheMib is < 0 or > 1L << 30) yield return $"--image-cache-mib must be 0 (off) to {1L << 30} (got {ImageCacheMib}).";
        if (PrefixCacheMib is < 0 or > 1L << 30) yield return $"--prefix-cache-mib must be 0 (off) to {1L << 30} (got {PrefixCacheMib}).";
        if (MaxPrefillTokens < 1) yield return $"--max-prefill-tokens must be ≥ 1 (got {MaxPrefillTokens}).";
        if (MaxWaitingSteps < 0) yield return $"--max-waiting-steps must be ≥ 0 (got {MaxWaitingSteps}).";
        if (MaxTiles is < 1) yield return $"--max-tiles must be ≥ 1 (got {MaxTiles}).";
        if (MaxTilesPerRequest < 1) yield return $"max tiles per request must be ≥ 1 (got {MaxTilesPerRequest}).";
        if (MaxImagesPerRequest < 0) yield return $"max images per request must be ≥ 0 (got {MaxImagesPerRequest}).";
        if (MaxImagePixels < 4) yield return $"max image pixels must be ≥ 4 (got {MaxImagePixels}).";
        if (MaxImageBytes < 1) yield return $"max image bytes must be ≥ 1 (got {MaxImageBytes}).";
        if (MaxRequestBytes < 1024) yield return $"max request bytes must be ≥ 1024 (got {MaxRequestBytes}).";
        if (MaxTokens < 1) yield return $"max tokens must be ≥ 1 (got {MaxTokens}).";
        if (DefaultMaxTokens < 1) yield return $"default max tokens must be ≥ 1 (got {DefaultMaxTokens}).";
        if (MaxConcurrentRequests < 1) yield return $"max concurrent requests must be ≥ 1 (got {MaxConcurrentRequests}).";
        if (!(RequestTimeoutSeconds > 0)) yield return $"request timeout must be > 0 s (got {RequestTimeoutSeconds}).";
        if (!(ImageFetchTimeoutSeconds > 0)) yield return $"image fetch timeout must be > 0 s (got {ImageFetchTimeoutSeconds}).";
        if (MaxConcurrentLargeBodies < 1) yield return $"max concurrent large bodies must be ≥ 1 (got {MaxConcurrentLargeBodies}).";
        if (MaxConnections < 1) yield return $"max connections must be ≥ 1 (got {MaxConnections}).";
        if (!(ShutdownGraceSeconds >= 0 && double.IsFinite(ShutdownGraceSeconds))) yield return $"shutdown grace must be ≥ 0 s (got {ShutdownGraceSeconds}).";
        foreach (var host in AllowedHosts)
            if (string.IsNullOrWhiteSpace(host) || host.Contains('/') || host.Contains(' ')) yield return $"--allowed-hosts '{host}' is not a host name (e.g. example.com, *.example.com, *).";
        if (MaxImageRedirects < 0) yield return $"max image redirects must be ≥ 0 (got {MaxImageRedirects}).";
        if (ApiKey is { Length: 0 }) yield return "--api-key must not be empty.";
        if (!string.IsNullOrWhiteSpace(ModelDir) && !Directory.Exists(ModelDir)) yield return $"--model {ModelDir}: folder not found.";
        if (AdapterDir is not null && !Directory.Exists(AdapterDir)) yield return $"--adapter {AdapterDir}: folder not found.";
        foreach (var problem in AdapterProblems()) yield return problem;
        if (AllowLocalImages is not null && !Directory.Exists(AllowLocalImages)) yield return $"--allow-local-images {AllowLocalImages}: folder not found.";
        foreach (var network in AllowedImageNetworks)
            if (!System.Net.IPNetwork.TryParse(network, out _)) yield return $"allowed image network '{network}' is not CIDR (e.g. 10.0.0.0/8).";
    }
}
