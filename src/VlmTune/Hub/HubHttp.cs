using System.Net;
using System.Net.Http.Headers;

namespace VlmTune.Hub;

/// <summary>What a request was for, so that a 404 or 401 can be told in the user's terms.</summary>
internal enum HubRequestKind { Listing, File }

/// <summary>
/// What the hub itself (not the storage it redirects to) says about a file, as huggingface_hub reads it:
/// <c>X-Linked-Etag</c> (else <c>ETag</c>; for LFS files the sha256), <c>X-Linked-Size</c>, <c>X-Repo-Commit</c>.
/// </summary>
internal sealed record HubFileHeaders(string? Etag, long? Size, string? Commit, bool EtagIsLinked = false)
{
    /// <summary>The sha256 the etag carries, if it is one (git blob ids of regular files are 40 hex digits).</summary>
    public string? Sha256 => HubPaths.IsSha256(Etag) ? Etag : null;
}

/// <summary>
/// HTTP to a hub: authorization, redirects, retries with exponential backoff, and status codes turned into errors that
/// say what to do. Transient failures (network, timeouts, 408/429/5xx) surface as <see cref="HubTransientException"/>
/// inside one attempt and are retried by <see cref="WithRetriesAsync{T}"/>.
/// </summary>
internal sealed class HubHttp : IDisposable
{
    private const int MaxRedirects = 10;
    private readonly HttpClient _client;
    private readonly HubSettings _settings;
    private readonly Uri _endpoint;

    public HubHttp(HubSettings settings)
    {
        _settings = settings;
        _endpoint = new Uri(settings.Endpoint);
        // Redirects are followed by hand: the token may go to the hub's own host but never to the CDN it redirects to.
        var handler = new SocketsHttpHandler
        {
            AllowAutoRedirect = false,
            AutomaticDecompression = DecompressionMethods.None,
            ConnectTimeout = TimeSpan.FromSeconds(30),
            PooledConnectionLifetime = TimeSpan.FromMinutes(5),
        };
        _client = new HttpClient(handler) { Timeout = Timeout.InfiniteTimeSpan };
        var version = typeof(HubHttp).Assembly.GetName().Version?.ToString(3) ?? "0";
        _client.DefaultRequestHeaders.UserAgent.Add(new ProductInfoHeaderValue("vlmtune", version));
    }

    public HubSettings Settings => _settings;

    /// <summary>Runs <paramref name="attempt"/> until it succeeds, retrying transient failures with backoff.</summary>
    public async Task<T> WithRetriesAsync<T>(
        string what, Func<CancellationToken, Task<T>> attempt, Action<int, TimeSpan, string>? onRetry, CancellationToken ct)
    {
        var options = _settings.Options;
        for (var failures = 0; ; failures++)
        {
            try
            {
                return await attempt(ct);
            }
            catch (HubTransientException e) when (failures < options.MaxRetries)
            {
                var delay = TimeSpan.FromTicks(Math.Min(options.MaxRetryDelay.Ticks, options.RetryDelay.Ticks << Math.Min(failures, 20)));
                onRetry?.Invoke(failures + 1, delay, e.Message);
                await Task.Delay(delay, ct);
            }
            catch (HubTransientException e)
            {
                throw new HubDownloadException(
                    $"{what} failed after {failures + 1} attempt(s): {e.Message}. Check the network and the endpoint " +
                    $"{_settings.Endpoint} (set --endpoint or HF_ENDPOINT for a mirror); rerunning resumes where it stopped.", e);
            }
        }
    }

    /// <summary>
    /// One GET, following redirects, returning the response of a 2xx (or 416, for the caller to handle). Throws
    /// <see cref="HubDownloadException"/> for answers that retrying cannot fix and <see cref="HubTransientException"/>
    /// for the rest.
    /// </summary>
    public async Task<HttpResponseMessage> GetAsync(
        Uri url, HubRequestKind kind, string subject, long rangeStart, CancellationToken ct) =>
        (await GetWithHeadersAsync(url, kind, subject, rangeStart, ct)).Response;

    /// <summary>As <see cref="GetAsync"/>, also returning the hub's file headers from the responses on its own origin.</summary>
    public async Task<(HttpResponseMessage Response, HubFileHeaders Headers)> GetWithHeadersAsync(
        Uri url, HubRequestKind kind, string subject, long rangeStart, CancellationToken ct)
    {
        var current = url;
        var headers = new HubFileHeaders(null, null, null);
        for (var hop = 0; hop <= MaxRedirects; hop++)
        {
            using var request = new HttpRequestMessage(HttpMethod.Get, current);
            // Compressed bodies would make sizes and Range offsets meaningless.
            request.Headers.AcceptEncoding.Add(new StringWithQualityHeaderValue("identity"));
            if (rangeStart > 0) request.Headers.Range = new RangeHeaderValue(rangeStart, null);
            if (_settings.Token is not null && SameOrigin(current, _endpoint))
                request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", _settings.Token);

            HttpResponseMessage response;
            using (var headersTimeout = CancellationTokenSource.CreateLinkedTokenSource(ct))
            {
                headersTimeout.CancelAfter(_settings.Options.ReadTimeout);
                try
                {
                    response = await _client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, headersTimeout.Token);
                }
                catch (HttpRequestException e)
                {
                    throw new HubTransientException($"cannot reach {current.GetLeftPart(UriPartial.Authority)} ({e.Message})", e);
                }
                catch (OperationCanceledException e) when (!ct.IsCancellationRequested)
                {
                    throw new HubTransientException($"no answer from {current.GetLeftPart(UriPartial.Authority)} within {_settings.Options.ReadTimeout.TotalSeconds:0} s", e);
                }
            }

            if (SameOrigin(current, _endpoint)) headers = Merge(headers, response);
            var status = (int)response.StatusCode;
            if (status is >= 300 and < 400 && response.Headers.Location is { } location)
            {
                current = location.IsAbsoluteUri ? location : new Uri(current, location);
                response.Dispose();
                continue;
            }
            if (response.IsSuccessStatusCode || response.StatusCode == HttpStatusCode.RequestedRangeNotSatisfiable)
                return (response, headers);

            using (response)
                throw await ErrorFor(response, kind, subject, ct);
        }
        throw new HubDownloadException($"Too many redirects (more than {MaxRedirects}) fetching {url}.");
    }

    private async Task<Exception> ErrorFor(HttpResponseMessage response, HubRequestKind kind, string subject, CancellationToken ct)
    {
        var status = (int)response.StatusCode;
        if (status is 408 or 429 or >= 500)
            return new HubTransientException($"HTTP {status} {response.ReasonPhrase} from {response.RequestMessage?.RequestUri}");

        // The Hugging Face hub says which thing is missing or refused in these headers.
        var errorCode = Header(response, "X-Error-Code");
        var serverMessage = Header(response, "X-Error-Message") ?? await BodySnippet(response, ct);
        var detail = string.IsNullOrWhiteSpace(serverMessage) ? "" : $" (server says: {serverMessage})";
        var repo = $"{_settings.RepoId} at revision '{_settings.Revision}' on {_settings.Endpoint}";

        if (status is 401 or 403 || errorCode == "GatedRepo")
        {
            var what = _settings.Token is null
                ? $"a token is needed: pass --token or set {_settings.TokenVariable}"
                : "the token was refused or has no access to this repo (for a gated repo, accept its conditions on the hub first)";
            return new HubDownloadException($"Access denied (HTTP {status}) to {subject} of {repo}: {what}{detail}.");
        }
        if (status == 404 || errorCode is "RepoNotFound" or "RevisionNotFound" or "EntryNotFound")
        {
            var what = errorCode switch
            {
                "RevisionNotFound" => $"revision '{_settings.Revision}' not found in {_settings.RepoId}",
                "EntryNotFound" => $"file '{subject}' not found in {repo}",
                "RepoNotFound" => $"repository {_settings.RepoId} not found on {_settings.Endpoint}",
                _ => kind == HubRequestKind.File
                    ? $"file '{subject}' not found in {repo}"
                    : $"repository {_settings.RepoId} or revision '{_settings.Revision}' not found on {_settings.Endpoint}",
            };
            var hint = _settings.Token is null ? $"; if the repo is private, pass --token or set {_settings.TokenVariable}" : "";
            return new HubDownloadException($"Not found (HTTP 404): {what}{detail}. Check the repo id and --revision{hint}.");
        }
        return new HubDownloadException($"HTTP {status} {response.ReasonPhrase} fetching {subject} of {repo}{detail}.");
    }

    private static HubFileHeaders Merge(HubFileHeaders known, HttpResponseMessage response)
    {
        // X-Linked-Etag is the hub's word on the file's content. A plain ETag, even from storage on the hub's own
        // origin, names only the bytes that server holds: it fills in when nothing linked is known, never overrides.
        var linked = NormalizeEtag(Header(response, "X-Linked-Etag"));
        var etag = linked ?? (known.EtagIsLinked ? known.Etag : NormalizeEtag(response.Headers.ETag?.Tag) ?? known.Etag);
        var size = long.TryParse(Header(response, "X-Linked-Size"), out var s) ? s : (long?)null;
        return new HubFileHeaders(etag, size ?? known.Size, Header(response, "X-Repo-Commit") ?? known.Commit,
            linked is not null || known.EtagIsLinked);
    }

    /// <summary>Strips the weak marker and quotes, as huggingface_hub's <c>_normalize_etag</c> does.</summary>
    private static string? NormalizeEtag(string? etag)
    {
        if (string.IsNullOrWhiteSpace(etag)) return null;
        if (etag.StartsWith("W/", StringComparison.Ordinal)) etag = etag[2..];
        etag = etag.Trim('"').ToLowerInvariant();
        return etag.Length == 0 ? null : etag;
    }

    private static string? Header(HttpResponseMessage response, string name) =>
        response.Headers.TryGetValues(name, out var values) ? values.FirstOrDefault() : null;

    private static async Task<string> BodySnippet(HttpResponseMessage response, CancellationToken ct)
    {
        try
        {
            var body = await response.Content.ReadAsStringAsync(ct);
            body = body.ReplaceLineEndings(" ").Trim();
            return body.Length > 300 ? body[..300] + "..." : body;
        }
        catch (Exception e) when (e is HttpRequestException or IOException) { return ""; }
    }

    private static bool SameOrigin(Uri a, Uri b) =>
        string.Equals(a.Scheme, b.Scheme, StringComparison.OrdinalIgnoreCase)
        && string.Equals(a.Host, b.Host, StringComparison.OrdinalIgnoreCase) && a.Port == b.Port;

    public void Dispose() => _client.Dispose();
}
