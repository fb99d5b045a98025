using System.Text.Json;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using VlmTune.Inference;
using VlmTune.IO;

namespace VlmTune.Serving;

/// <summary>
/// The admin routes of a server that serves adapters (as vLLM's <c>/v1/load_lora_adapter</c> and
/// <c>/v1/unload_lora_adapter</c>): <c>GET /v1/adapters</c> lists them, <c>POST /v1/adapters {"name", "path"}</c> loads
/// one from a folder under <see cref="ServerOptions.AllowAdapterLoading"/>, <c>DELETE /v1/adapters/{name}</c> unloads
/// one. Loading and unloading need the API key and never disturb running requests: an unloaded adapter's running
/// requests finish with it (its weights are freed after the last), new ones get 404.
/// </summary>
public static class AdaptersApi
{
    private const int MaxBodyBytes = 64 * 1024;

    public static IEndpointRouteBuilder MapAdaptersApi(this IEndpointRouteBuilder app)
    {
        app.MapGet("/v1/adapters", (ServingState s) => TypedResults.Ok(new
        {
            @object = "list",
            data = (s.Adapters?.All ?? []).Select(a => new { id = a.Name, @object = "adapter", created = a.Loaded.ToUnixTimeSeconds(), parent = s.ModelId, description = a.Description, running = a.Running }),
        }));
        app.MapPost("/v1/adapters", LoadAsync);
        app.MapDelete("/v1/adapters/{name}", (string name, ServingState s) =>
        {
            var adapters = Admin(s);
            ServedAdapter gone;
            try { gone = adapters.Unload(name); }
            catch (UnknownModelException e) { throw ModelsApi.NotFound(e); }
            catch (InvalidAdapterException e) { throw ApiException.BadRequest(e.Message, e.Param); }
            // running: requests still finishing with it (its weights are freed after the last of them).
            return TypedResults.Ok(new { id = gone.Name, @object = "model", deleted = true, running = gone.Running });
        });
        return app;
    }

    /// <summary>The server's adapters when it lets them be changed at run time; 403 otherwise.</summary>
    private static ServedAdapters Admin(ServingState s)
    {
        // ServerOptions.Validate already ties --allow-adapter-loading to --api-key; never open these routes without one.
        if (s.Options.AllowAdapterLoading is null || s.Options.ApiKey is null || s.Adapters is null)
            throw new ApiException(403, "This server does not load or unload adapters at run time; start it with --allow-adapter-loading DIR and --api-key.", null, "adapter_loading_disabled", "permission_error");
        return s.Adapters;
    }

    private static async Task<IResult> LoadAsync(HttpContext context, ServingState s)
    {
        var adapters = Admin(s);
        var (name, path) = await ReadAsync(context.Request, context.RequestAborted);
        if (ModelNames.Problem(name) is { } problem) throw ApiException.BadRequest(problem + ".", "name");
        string root = Path.GetFullPath(s.Options.AllowAdapterLoading!);
        // A relative path is taken under the folder; any path must stay inside it once every symlink is followed.
        string dir = Path.GetFullPath(Path.Combine(root, path));
        if (!RealPath.IsSameOrInside(dir, root) || !Directory.Exists(dir))
            throw ApiException.BadRequest("'path' must name a folder inside this server's adapter folder (--allow-adapter-loading).", "path", "adapter_not_found");
        try
        {
            // Reading and checking the files takes a while for large adapters: off the request thread.
            var adapter = await Task.Run(() => adapters.Load(name, dir), context.RequestAborted);
            return TypedResults.Ok(new { id = adapter.Name, @object = "model", created = adapter.Loaded.ToUnixTimeSeconds(), parent = s.ModelId, description = adapter.Description });
        }
        catch (AdapterConflictException e) { throw new ApiException(409, e.Message, "name", "adapter_exists"); }
        catch (InvalidAdapterException e) { throw ApiException.BadRequest(Redact(e.Message, root), e.Param, "invalid_adapter"); }
    }

    /// <summary>The adapter's messages name its files: relative to the adapter folder here, as the client named them.</summary>
    private static string Redact(string message, string root) =>
        message.Replace(Path.TrimEndingDirectorySeparator(root) + Path.DirectorySeparatorChar, "", StringComparison.Ordinal)
               .Replace(Path.TrimEndingDirectorySeparator(root), ".", StringComparison.Ordinal);

    private static async Task<(string Name, string Path)> ReadAsync(HttpRequest request, CancellationToken cancellation)
    {
        if (request.ContentLength > MaxBodyBytes) throw new ApiException(413, "The request body is larger than this route accepts.", null, "request_too_large");
        using var buffer = new MemoryStream();
        var chunk = new byte[16 * 1024];
        int read;
        while ((read = await request.Body.ReadAsync(chunk, cancellation)) > 0)
        {
            if (buffer.Length + read > MaxBodyBytes) throw new ApiException(413, "The request body is larger than this route accepts.", null, "request_too_large");
            buffer.Write(chunk, 0, read);
        }
        JsonDocument document;
        try { document = JsonDocument.Parse(buffer.ToArray(), new JsonDocumentOptions { MaxDepth = 8 }); }
        catch (JsonException) { throw ApiException.BadRequest("The request body is not valid JSON.", null, "invalid_json"); }
        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object) throw ApiException.BadRequest("The request body must be a JSON object {\"name\": ..., \"path\": ...}.");
            return (Field(root, "name"), Field(root, "path"));
        }
    }

    private static string Field(JsonElement root, string field)
    {
        if (!root.TryGetProperty(field, out var e) || e.ValueKind != JsonValueKind.String)
            throw ApiException.BadRequest($"'{field}' is required and must be a string.", field);
        string? value;
        try { value = e.GetString(); }
        catch (InvalidOperationException) { throw ApiException.BadRequest($"'{field}' is not valid Unicode text.", field); }
        if (string.IsNullOrEmpty(value) || value.Contains('\0')) throw ApiException.BadRequest($"'{field}' must not be empty.", field);
        return value;
    }
}
