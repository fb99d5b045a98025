using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;

namespace VlmTune.Serving;

/// <summary><c>GET /</c>: a small chat page (embedded in the assembly) that talks to this server's own API.</summary>
public static class ChatPage
{
    public static readonly IReadOnlySet<string> Paths = new HashSet<string> { "/", "/index.html" };

    private static readonly Lazy<byte[]> Html = new(() =>
    {
        using var stream = typeof(ChatPage).Assembly.GetManifestResourceStream("VlmTune.Serving.index.html")
            ?? throw new InvalidOperationException("The chat page resource is missing from the assembly.");
        using var copy = new MemoryStream();
        stream.CopyTo(copy);
        return copy.ToArray();
    });

    public static IEndpointRouteBuilder MapChatPage(this IEndpointRouteBuilder app)
    {
        foreach (var path in Paths)
            app.MapGet(path, (HttpContext context) =>
            {
                var headers = context.Response.Headers;
                // The page only talks to this origin; images are previewed from data:/blob: URLs.
                headers.ContentSecurityPolicy = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";
                headers.XContentTypeOptions = "nosniff";
                headers["Referrer-Policy"] = "no-referrer";
                return TypedResults.Bytes(Html.Value, "text/html; charset=utf-8");
            });
        return app;
    }
}
