using System.Net;
using System.Net.Http.Headers;

namespace VlmTune.Hub;

/// <summary>What a request was for, so that a 404 or 401 can be told in the user's terms.</summary>
internal enum HubRequestKind { Listing, File }

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
        Uri url, HubRequestKind kind, string subject, long rangeStart, CancellationToken ct)
    {
        var current = url;
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

            var status = (int)response.StatusCode;
            if (status is >= 300 and < 400 && response.Headers.Location is { } location)
            {
                current = location.IsAbsoluteUri ? location : new Uri(current, location);
                response.Dispose();
                continue;
            }
            if (response.IsSuccessStatusCode || response.StatusCode == HttpStatusCode.RequestedRangeNotSatisfiable)
                return response;

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
