using System.Net;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using VlmTune.Data;

namespace VlmTune.Serving;

/// <summary>
/// <c>vlmtune data browse</c>'s host: one static page and a JSON API over a <see cref="DatasetBrowser"/>, on loopback
/// unless told otherwise. The page only shows what the library computes.
/// </summary>
public static class DatasetBrowserServer
{
    /// <summary>Builds (does not start) the app; the caller keeps owning <paramref name="browser"/>.</summary>
    public static WebApplication Build(DatasetBrowser browser, string host = "127.0.0.1", int port = 0)
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
            // DNS rebinding: on loopback only loopback names may reach the data.
            if (loopback && context.Request.Host.HasValue && !VlmTuneServer.IsLoopbackName(context.Request.Host.Host))
            {
                await Error(context, 400, $"The Host '{ModelsApi.Clip(context.Request.Host.Host)}' is not accepted (DNS rebinding protection).");
                return;
            }
            try { await next(context); }
            catch (KeyNotFoundException e) when (!context.Response.HasStarted) { await Error(context, 404, e.Message); }
            catch (VlmTuneException e) when (!context.Response.HasStarted) { await Error(context, 400, e.Message); }
            catch (OperationCanceledException) when (context.RequestAborted.IsCancellationRequested) { }
        });
        app.MapBrowserApi(browser);
        app.MapFallback((HttpContext c) => Error(c, 404, "Unknown endpoint."));
        return app;
    }

    private static Task Error(HttpContext context, int status, string message)
    {
        context.Response.StatusCode = status;
        return context.Response.WriteAsJsonAsync(new { error = message });
    }

    public static IEndpointRouteBuilder MapBrowserApi(this IEndpointRouteBuilder app, DatasetBrowser browser)
    {
        app.MapGet("/", (HttpContext context) =>
        {
            var headers = context.Response.Headers;
            headers.ContentSecurityPolicy = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";
            headers.XContentTypeOptions = "nosniff";
            return TypedResults.Bytes(Page.Value, "text/html; charset=utf-8");
        });
        app.MapGet("/api/summary", () => TypedResults.Ok(browser.Summary()));
        app.MapGet("/api/samples", (int? offset, int? limit, bool? problems, string? q, CancellationToken ct) =>
        {
            var page = browser.Page(offset ?? 0, limit ?? 20, problems ?? false, q, ct);
            return TypedResults.Ok(new { samples = page.Samples.Select(View).ToList(), matched = page.Matched, complete = page.Complete });
        });
        app.MapGet("/api/samples/{index:long}", (long index, CancellationToken ct) =>
        {
            var detail = browser.Detail(index, ct) ?? throw new KeyNotFoundException($"there is no record {index}");
            return TypedResults.Ok(new
            {
                sample = View(detail.Sample),
                grids = detail.Grids.Select(g => g is { } t ? new { columns = t.Columns, rows = t.Rows, thumbnail = t.Thumbnail } : null).ToList(),
                tokens = detail.Tokens,
            });
        });
        app.MapGet("/api/samples/{index:long}/images/{image:int}", (long index, int image, CancellationToken ct) =>
        {
            var path = browser.ImagePath(index, image, ct);
            if (!File.Exists(path)) throw new KeyNotFoundException($"record {index}: image {image} ({path}) does not exist");
            return Results.File(path, ContentType(path));
        });
        return app;
    }

    private static object View(BrowsedSample s)
    {
        var sample = s.Sample;
        return new
        {
            index = s.Index,
            id = sample?.Id,
            file = s.Source.File,
            line = s.Source.Line,
            dataset = sample?.Dataset,
            turns = sample?.Conversations.Select(t => new { from = t.From, value = t.Value }).ToList(),
            images = s.Facts.Images.Select(i => new { path = i.Path, width = i.Width, height = i.Height, tiles = i.Tiles, problem = i.Problem }).ToList(),
            problems = s.Facts.Problems.Select(p => new { kind = p.Kind.ToString(), message = p.Message }).ToList(),
            length = s.Facts.Length,
        };
    }

    private static string ContentType(string path) => Path.GetExtension(path).ToLowerInvariant() switch
    {
        ".png" => "image/png",
        ".gif" => "image/gif",
        ".webp" => "image/webp",
        ".bmp" => "image/bmp",
        _ => "image/jpeg",
    };

    private static readonly Lazy<byte[]> Page = new(() =>
    {
        using var stream = typeof(DatasetBrowserServer).Assembly.GetManifestResourceStream("VlmTune.Serving.browse.html")
            ?? throw new InvalidOperationException("The dataset browser page resource is missing from the assembly.");
        using var copy = new MemoryStream();
        stream.CopyTo(copy);
        return copy.ToArray();
    });
}
