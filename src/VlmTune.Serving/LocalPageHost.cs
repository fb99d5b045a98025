using System.Net;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace VlmTune.Serving;

/// <summary>
/// The host of a local single-page tool (<c>data browse</c>, <c>dashboard</c>): Kestrel on one address, snake_case
/// JSON, errors as <c>{"error": ...}</c> with their status (404 for what is not there, 400 for a bad request), and on
/// loopback only loopback Host names, so a web page elsewhere cannot reach the data through DNS rebinding.
/// </summary>
internal static class LocalPageHost
{
    /// <summary>The page's own security headers: nothing loads from elsewhere, nothing frames it.</summary>
    public const string ContentSecurityPolicy =
        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

    /// <summary>Builds (does not start) the app: <paramref name="map"/> adds the page and its API.</summary>
    public static WebApplication Build(string host, int port, Action<WebApplication> map)
    {
        var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions { Args = [] });
        builder.Logging.ClearProviders();
        builder.Services.AddSingleton<IHostLifetime, ExternallyStoppedLifetime>();
        builder.Services.ConfigureHttpJsonOptions(o => o.SerializerOptions.PropertyNamingPolicy = System.Text.Json.JsonNamingPolicy.SnakeCaseLower);
        builder.WebHost.ConfigureKestrel(k =>
        {
            k.AddServerHeader = false;
            if (host == "localhost") k.ListenLocalhost(port);
            else if (IPAddress.TryParse(host, out var ip)) k.Listen(ip, port);
            else throw new VlmTuneException($"--host '{host}' must be an IP address (e.g. 127.0.0.1, 0.0.0.0) or localhost.");
        });
        var loopback = host == "localhost" || (IPAddress.TryParse(host, out var address) && IPAddress.IsLoopback(address));
        var app = builder.Build();
        app.Use(async (context, next) =>
        {
            if (loopback && context.Request.Host.HasValue && !VlmTuneServer.IsLoopbackName(context.Request.Host.Host))
            {
                await Error(context, 400, $"The Host '{ModelsApi.Clip(context.Request.Host.Host)}' is not accepted (DNS rebinding protection).");
                return;
            }
            try { await next(context); }
            catch (KeyNotFoundException e) when (!context.Response.HasStarted) { await Error(context, 404, e.Message); }
            catch (VlmTuneException e) when (!context.Response.HasStarted) { await Error(context, 400, e.Message); }
            catch (BadHttpRequestException e) when (!context.Response.HasStarted) { await Error(context, 400, e.Message); }
            catch (OperationCanceledException) when (context.RequestAborted.IsCancellationRequested) { }
        });
        map(app);
        app.MapFallback((HttpContext c) => Error(c, 404, "Unknown endpoint."));
        return app;
    }

    /// <summary>The tool's HTML page with its security headers.</summary>
    public static IResult Page(HttpContext context, byte[] html)
    {
        context.Response.Headers.ContentSecurityPolicy = ContentSecurityPolicy;
        context.Response.Headers.XContentTypeOptions = "nosniff";
        return TypedResults.Bytes(html, "text/html; charset=utf-8");
    }

    public static Task Error(HttpContext context, int status, string message)
    {
        context.Response.StatusCode = status;
        return context.Response.WriteAsJsonAsync(new { error = message });
    }
}
