using System.Net;
using System.Net.Http.Headers;
using System.Net.Sockets;

namespace VlmTune.Serving;

/// <summary>
/// The one way the server reads http(s) images. Every connection goes through <see cref="ConnectAsync"/>, which
/// resolves the host itself and connects only to addresses that are public (or inside an explicitly allowed network),
/// so a hostname that resolves to 127.0.0.1, 10.x, 169.254.169.254 (cloud metadata) or a DNS-rebinding trick is
/// refused on the address actually used. Redirects are followed by hand, each one through the same checks; no proxy is
/// used (it would connect on our behalf); size and time limits hold while the body streams in.
/// </summary>
public sealed class RemoteImageFetcher : IDisposable
{
    private readonly HttpClient _http;
    private readonly IPNetwork[] _allowed;
    private readonly long _maxBytes;
    private readonly TimeSpan _timeout;
    private readonly int _maxRedirects;

    public RemoteImageFetcher(ServerOptions options)
    {
        _allowed = options.AllowedImageNetworks.Select(n => IPNetwork.Parse(n)).ToArray();
        _maxBytes = options.MaxImageBytes;
        _timeout = TimeSpan.FromSeconds(options.ImageFetchTimeoutSeconds);
        _maxRedirects = options.MaxImageRedirects;
        var handler = new SocketsHttpHandler
        {
            AllowAutoRedirect = false,
            UseProxy = false,
            UseCookies = false,
            AutomaticDecompression = DecompressionMethods.None,
            ConnectTimeout = _timeout,
            PooledConnectionLifetime = TimeSpan.FromMinutes(1),
            MaxResponseHeadersLength = 64,   // KiB
            ConnectCallback = ConnectAsync,
        };
        _http = new HttpClient(handler) { Timeout = Timeout.InfiniteTimeSpan };
        _http.DefaultRequestHeaders.UserAgent.Add(new ProductInfoHeaderValue("vlmtune", "1"));
    }

    /// <summary>Whether an address may be connected to: public, or inside a network the operator allowed.</summary>
    public bool IsAllowed(IPAddress address)
    {
        if (address.IsIPv4MappedToIPv6) address = address.MapToIPv4();
        if (_allowed.Any(n => n.Contains(address))) return true;
        return !IsInternal(address);
    }

    /// <summary>Loopback, private, link-local (cloud metadata lives there), shared, multicast, unspecified and other special ranges.</summary>
    public static bool IsInternal(IPAddress a)
    {
        if (a.IsIPv4MappedToIPv6) a = a.MapToIPv4();
        if (IPAddress.IsLoopback(a) || a.Equals(IPAddress.Any) || a.Equals(IPAddress.IPv6Any) || a.Equals(IPAddress.Broadcast)) return true;
        if (a.AddressFamily == AddressFamily.InterNetwork)
        {
            var b = a.GetAddressBytes();
            return b[0] switch
            {
                0 or 10 or 127 => true,
                100 => b[1] >= 64 && b[1] < 128,                  // 100.64/10 carrier-grade NAT (and Alibaba's metadata)
                169 => b[1] == 254,                               // link-local, 169.254.169.254 metadata
                172 => b[1] >= 16 && b[1] < 32,
                192 => (b[1] == 168) || (b[1] == 0 && b[2] == 0) || (b[1] == 0 && b[2] == 2),
                198 => b[1] == 18 || b[1] == 19 || (b[1] == 51 && b[2] == 100),
                203 => b[1] == 0 && b[2] == 113,
                >= 224 => true,                                   // multicast, reserved
                _ => false,
            };
        }
        if (a.IsIPv6LinkLocal || a.IsIPv6SiteLocal || a.IsIPv6Multicast || a.IsIPv6UniqueLocal) return true;   // fe80::/10, fec0::/10, ff00::/8, fc00::/7
        var v6 = a.GetAddressBytes();
        if (v6[0] == 0x20 && v6[1] == 0x01 && v6[2] == 0x0d && v6[3] == 0xb8) return true;                       // 2001:db8::/32 documentation
        if (v6[0] == 0x00 && v6.Take(12).All(x => x == 0)) return true;                                         // ::/96 (IPv4-compatible)
        if (v6[0] == 0x00 && v6[1] == 0x64 && v6[2] == 0xff && v6[3] == 0x9b) return true;                       // 64:ff9b::/96 NAT64 can reach internal IPv4
        return false;
    }

    private async ValueTask<Stream> ConnectAsync(SocketsHttpConnectionContext context, CancellationToken cancellation)
    {
        var host = context.DnsEndPoint.Host;
        IPAddress[] addresses = IPAddress.TryParse(host.Trim('[', ']'), out var literal)
            ? [literal]
            : await Dns.GetHostAddressesAsync(host, cancellation).ConfigureAwait(false);
        var usable = addresses.Where(IsAllowed).ToArray();
        if (usable.Length == 0) throw new ImageFetchRefusedException();
        var socket = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        try
        {
            await socket.ConnectAsync(usable, context.DnsEndPoint.Port, cancellation).ConfigureAwait(false);
            return new NetworkStream(socket, ownsSocket: true);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    /// <summary>The image's bytes, or <see cref="ApiException"/> (400, param image_url) saying what went wrong in client terms.</summary>
    public async Task<byte[]> FetchAsync(Uri url, CancellationToken cancellation)
    {
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellation);
        timeout.CancelAfter(_timeout);
        try
        {
            for (int hop = 0; ; hop++)
            {
                CheckUrl(url);
                using var request = new HttpRequestMessage(HttpMethod.Get, url);
                request.Headers.Accept.ParseAdd("image/*");
                using var response = await _http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, timeout.Token).ConfigureAwait(false);
                int status = (int)response.StatusCode;
                if (status is >= 300 and < 400 && response.Headers.Location is { } location)
                {
                    if (hop >= _maxRedirects) throw Fail($"the image URL redirected more than {_maxRedirects} times.");
                    url = location.IsAbsoluteUri ? location : new Uri(url, location);
                    continue;
                }
                if (status is < 200 or >= 300) throw Fail($"fetching the image URL failed with HTTP status {status}.");
                if (response.Content.Headers.ContentLength is { } length && length > _maxBytes)
                    throw Fail($"the image is {length:N0} bytes, above this server's limit of {_maxBytes:N0}.");
                return await ReadLimitedAsync(response.Content, timeout.Token).ConfigureAwait(false);
            }
        }
        catch (OperationCanceledException) when (!cancellation.IsCancellationRequested)
        {
            throw Fail($"fetching the image URL took longer than {_timeout.TotalSeconds:0.#} s.");
        }
        catch (HttpRequestException e) when (FindRefusal(e))
        {
            throw Fail("the image URL's host is not allowed (loopback, private, link-local and metadata addresses are refused).", "image_url_forbidden");
        }
        catch (HttpRequestException)
        {
            throw Fail("the image URL could not be fetched (connection failed).");
        }
    }

    private static bool FindRefusal(Exception e)
    {
        for (Exception? x = e; x is not null; x = x.InnerException) if (x is ImageFetchRefusedException) return true;
        return false;
    }

    private void CheckUrl(Uri url)
    {
        if (url.Scheme != Uri.UriSchemeHttp && url.Scheme != Uri.UriSchemeHttps) throw Fail("image URLs must be http or https (redirects too).");
        if (!string.IsNullOrEmpty(url.UserInfo)) throw Fail("image URLs must not carry credentials.");
        // Literal addresses are refused before any connection attempt (the connect callback checks hostnames' addresses).
        if (IPAddress.TryParse(url.Host.Trim('[', ']'), out var ip) && !IsAllowed(ip))
            throw Fail("the image URL's host is not allowed (loopback, private, link-local and metadata addresses are refused).", "image_url_forbidden");
    }

    private async Task<byte[]> ReadLimitedAsync(HttpContent content, CancellationToken cancellation)
    {
        await using var stream = await content.ReadAsStreamAsync(cancellation).ConfigureAwait(false);
        using var buffer = new MemoryStream();
        var chunk = new byte[81920];
        int read;
        while ((read = await stream.ReadAsync(chunk, cancellation).ConfigureAwait(false)) > 0)
        {
            if (buffer.Length + read > _maxBytes) throw Fail($"the image is larger than this server's limit of {_maxBytes:N0} bytes.");
            buffer.Write(chunk, 0, read);
        }
        return buffer.ToArray();
    }

    private static ApiException Fail(string message, string? code = null) => ApiException.BadRequest("image_url: " + message, "image_url", code ?? "invalid_image_url");

    public void Dispose() => _http.Dispose();

    private sealed class ImageFetchRefusedException() : Exception("address not allowed");
}
