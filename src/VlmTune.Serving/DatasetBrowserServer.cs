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
    public static WebApplication Build(DatasetBrowser browser, string host = "127.0.0.1", int port = 0) =>
        LocalPageHost.Build(host, port, app => app.MapBrowserApi(browser));

    public static IEndpointRouteBuilder MapBrowserApi(this IEndpointRouteBuilder app, DatasetBrowser browser)
    {
        app.MapGet("/", (HttpContext context) => LocalPageHost.Page(context, Page.Value));
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
