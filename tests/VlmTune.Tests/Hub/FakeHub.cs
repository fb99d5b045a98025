using System.Collections.Concurrent;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Logging;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Hub;

/// <summary>
/// A hub on 127.0.0.1 (Kestrel, free port) serving the tiny fixture model the way the Hugging Face hub and ModelScope
/// do: listing APIs, resolve URLs (LFS files redirect to a "CDN" path, like the real hub), Range requests. Faults can be
/// switched on: a connection cut after N bytes, a stall, corrupted content, a required token, transient 503s. Every
/// request is logged so tests can assert what the client asked for (e.g. <c>Range: bytes=N-</c>).
/// </summary>
internal sealed class FakeHub : IAsyncDisposable
{
    public const string RepoId = "test-org/tiny-internvl2";
    public const string Commit = "4f0c2a9e1b7d3c5a8e6f0b2d4c6a8e0f1b3d5c7a";

    public sealed record RepoFile(string Path, byte[] Bytes, bool Lfs)
    {
        public string Sha256 { get; } = Convert.ToHexStringLower(SHA256.HashData(Bytes));
        // What git calls the blob id: sha1 over "blob <size>\0" + content.
        public string BlobId { get; } = Convert.ToHexStringLower(SHA1.HashData(
            [.. Encoding.ASCII.GetBytes($"blob {Bytes.Length}\0"), .. Bytes]));
    }

    /// <summary>One request as the server saw it; <see cref="File"/> is the repo path a file request was for.</summary>
    public sealed record Logged(string Kind, string? File, string? Range, string? Authorization, string Url);

    private static readonly Lazy<IReadOnlyList<RepoFile>> TinyRepo = new(LoadTinyRepo);

    private readonly WebApplication _app;
    private readonly Dictionary<string, RepoFile> _byPath;
    private readonly ConcurrentDictionary<string, long> _cutOnce = new();
    private readonly ConcurrentDictionary<string, Stall> _stallOnce = new();
    private int _transientFailures;

    public IReadOnlyList<RepoFile> Files { get; }
    public string Endpoint { get; private set; } = "";
    public ConcurrentQueue<Logged> Requests { get; } = new();

    /// <summary>When set, API and resolve requests without <c>Authorization: Bearer</c> this token get 401.</summary>
    public string? RequiredToken { get; set; }

    /// <summary>Repo paths served with one byte flipped (same size, wrong sha256).</summary>
    public ConcurrentDictionary<string, bool> Corrupt { get; } = new();

    /// <summary>Like a mirror that ignores <c>?blobs=true</c>: the listing has names only (no sizes, no sha256).</summary>
    public bool ListsNamesOnly { get; set; }

    /// <summary>When set, LFS redirects go to this host name (another origin, like the hub's storage) instead of a relative path.</summary>
    public string? CdnHost { get; set; }

    /// <summary>An extra path put in the listings (to test that odd paths are refused).</summary>
    public string? ExtraListedPath { get; set; }

    /// <summary>blobId the Hugging Face listing gives a file instead of its real one (a hostile or broken hub).</summary>
    public ConcurrentDictionary<string, string> ListedBlobIds { get; } = new();

    /// <summary>The listing's commit instead of <see cref="Commit"/>.</summary>
    public string? ListedCommit { get; set; }

    /// <summary>X-Linked-Etag the resolve answer gives an LFS file instead of its sha256 (storage still serves the real bytes).</summary>
    public ConcurrentDictionary<string, string> LinkedEtags { get; } = new();

    private FakeHub(WebApplication app, IReadOnlyList<RepoFile> files)
    {
        _app = app;
        Files = files;
        _byPath = files.ToDictionary(f => f.Path);
    }

    public RepoFile File(string path) => _byPath[path];

    /// <summary>The next transfer of <paramref name="path"/> stops at file byte <paramref name="offset"/> and the connection is dropped.</summary>
    public void CutOnce(string path, long offset) => _cutOnce[path] = offset;

    /// <summary>The next transfer of <paramref name="path"/> pauses at file byte <paramref name="offset"/> until released.</summary>
    public Stall StallOnce(string path, long offset) => _stallOnce[path] = new Stall(offset);

    /// <summary>The next <paramref name="count"/> requests of any kind get 503.</summary>
    public void FailNext(int count) => Interlocked.Exchange(ref _transientFailures, count);

    public sealed class Stall(long offset)
    {
        public long Offset { get; } = offset;
        public TaskCompletionSource Reached { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public TaskCompletionSource Release { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
    }

    /// <summary>Transfers of a repo file (HF resolve/CDN or ModelScope file API) that carried bytes.</summary>
    public IEnumerable<Logged> Transfers(string path) =>
        Requests.Where(r => r.File == path && r.Kind is "cdn" or "resolve" or "ms-file");

    public static async Task<FakeHub> StartAsync()
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.WebHost.UseUrls("http://127.0.0.1:0");
        var hub = new FakeHub(builder.Build(), TinyRepo.Value);
        hub.MapRoutes();
        await hub._app.StartAsync();
        hub.Endpoint = hub._app.Urls.Single().TrimEnd('/'); // the port Kestrel picked
        return hub;
    }

    private static IReadOnlyList<RepoFile> LoadTinyRepo()
    {
        var dir = Fixtures.TinyModel;
        var files = Directory.GetFiles(dir).Order(StringComparer.Ordinal).Select(p =>
        {
            var name = Path.GetFileName(p);
            return new RepoFile(name, System.IO.File.ReadAllBytes(p), Lfs: name.EndsWith(".safetensors") || name.EndsWith(".model"));
        }).ToList();
        // Like a real repo: LFS rules, and a file in a folder whose name needs URL escaping.
        files.Add(new RepoFile(".gitattributes", "*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.model filter=lfs diff=lfs merge=lfs -text\n"u8.ToArray(), false));
        files.Add(new RepoFile("examples/hello world.txt", "<image>\nDescribe the image.\n"u8.ToArray(), false));
        return files;
    }

    private void MapRoutes()
    {
        _app.Use(async (ctx, next) =>
        {
            if (Interlocked.Decrement(ref _transientFailures) >= 0)
            {
                Log(ctx, "503", null);
                ctx.Response.StatusCode = 503;
                return;
            }
            await next();
        });

        // Hugging Face
        _app.MapGet("/api/models/{owner}/{name}/revision/{revision}", (HttpContext ctx, string owner, string name, string revision) =>
        {
            Log(ctx, "hf-list", null);
            if (Refuse(ctx, $"{owner}/{name}", revision, out var refusal)) return refusal;
            var blobs = ctx.Request.Query["blobs"] == "true" && !ListsNamesOnly;
            var siblings = Listed().Select(f => blobs
                ? (object)new
                {
                    rfilename = f.Path, size = f.Bytes.LongLength,
                    blobId = ListedBlobIds.TryGetValue(f.Path, out var id) ? id : f.Lfs ? "0000000000000000000000000000000000000000" : f.BlobId,
                    lfs = f.Lfs ? new { sha256 = f.Sha256, size = f.Bytes.LongLength, pointerSize = 134 } : null,
                }
                : new { rfilename = f.Path });
            return Results.Json(new { _id = "x", id = RepoId, sha = ListedCommit ?? Commit, siblings }, AsWritten);
        });
        _app.MapGet("/{owner}/{name}/resolve/{revision}/{**path}", (HttpContext ctx, string owner, string name, string revision, string path) =>
        {
            Log(ctx, "resolve", path);
            if (Refuse(ctx, $"{owner}/{name}", revision, out var refusal)) return refusal;
            if (!_byPath.TryGetValue(path, out var file)) return Error(404, "EntryNotFound", $"{path} does not exist on {revision}");
            ctx.Response.Headers["X-Repo-Commit"] = Commit;
            if (!file.Lfs) return Serve(file, $"\"{file.BlobId}\"");
            // LFS: the hub answers with the metadata headers and a redirect to the storage that serves the bytes.
            ctx.Response.Headers["X-Linked-Etag"] = $"\"{LinkedEtags.GetValueOrDefault(file.Path, file.Sha256)}\"";
            ctx.Response.Headers["X-Linked-Size"] = file.Bytes.Length.ToString();
            var storage = CdnHost is null ? "" : $"http://{CdnHost}:{ctx.Request.Host.Port}";
            return Results.Redirect($"{storage}/cdn/{file.Sha256}?name={Uri.EscapeDataString(file.Path)}");
        });
        _app.MapGet("/cdn/{sha}", (HttpContext ctx, string sha) =>
        {
            var file = Files.FirstOrDefault(f => f.Sha256 == sha);
            Log(ctx, "cdn", file?.Path);
            return file is null ? Results.NotFound() : Serve(file, $"\"{file.Sha256}\"");
        });

        // ModelScope
        _app.MapGet("/api/v1/models/{owner}/{name}/repo/files", (HttpContext ctx, string owner, string name) =>
        {
            Log(ctx, "ms-list", null);
            if (Unauthorized(ctx)) return Results.StatusCode(401);
            if ($"{owner}/{name}" != RepoId)
                return Results.Json(new { Code = 10010205, Message = $"Model {owner}/{name} not exists", Success = false }, AsWritten);
            var entries = Listed().Select(f => (object)new
            {
                Name = Path.GetFileName(f.Path), f.Path, Type = "blob", Size = f.Bytes.LongLength, Sha256 = f.Sha256,
                IsLFS = f.Lfs, Revision = Commit, Mode = "33188",
            }).Append(new { Name = "examples", Path = "examples", Type = "tree", Size = 0L, Sha256 = "", IsLFS = false, Revision = Commit, Mode = "16384" });
            return Results.Json(new { Code = 200, Data = new { Files = entries }, Message = "success", Success = true }, AsWritten);
        });
        _app.MapGet("/api/v1/models/{owner}/{name}/repo", (HttpContext ctx, string owner, string name) =>
        {
            var path = ctx.Request.Query["FilePath"].ToString();
            Log(ctx, "ms-file", path);
            if (Unauthorized(ctx)) return Results.StatusCode(401);
            if ($"{owner}/{name}" != RepoId || !_byPath.TryGetValue(path, out var file)) return Results.NotFound();
            return Serve(file, $"\"{file.Sha256}\"");
        });
    }

    // Property names exactly as written (the hubs' JSON is PascalCase on ModelScope, snake/camel on Hugging Face).
    private static readonly JsonSerializerOptions AsWritten = new() { PropertyNamingPolicy = null };

    private IEnumerable<RepoFile> Listed() =>
        ExtraListedPath is null ? Files : Files.Append(new RepoFile(ExtraListedPath, [1, 2, 3], false));

    private void Log(HttpContext ctx, string kind, string? file) =>
        Requests.Enqueue(new Logged(kind, file, ctx.Request.Headers.Range.FirstOrDefault(),
            ctx.Request.Headers.Authorization.FirstOrDefault(), ctx.Request.Path + ctx.Request.QueryString));

    private bool Unauthorized(HttpContext ctx) =>
        RequiredToken is not null && ctx.Request.Headers.Authorization.FirstOrDefault() != $"Bearer {RequiredToken}";

    private bool Refuse(HttpContext ctx, string repo, string revision, out IResult refusal)
    {
        refusal = Unauthorized(ctx) ? Error(401, null, "Invalid credentials in Authorization header")
            : repo != RepoId ? Error(404, "RepoNotFound", "Repository not found")
            : revision is not ("main" or Commit) ? Error(404, "RevisionNotFound", $"Invalid rev id: {revision}")
            : null!;
        return refusal is not null;
    }

    private static IResult Error(int status, string? code, string message) => new ErrorResult(status, code, message);

    private sealed class ErrorResult(int status, string? code, string message) : IResult
    {
        public Task ExecuteAsync(HttpContext ctx)
        {
            ctx.Response.StatusCode = status;
            if (code is not null) ctx.Response.Headers["X-Error-Code"] = code;
            ctx.Response.Headers["X-Error-Message"] = message;
            return ctx.Response.WriteAsJsonAsync(new { error = message });
        }
    }

    private IResult Serve(RepoFile file, string etag) => new FileBytesResult(this, file, etag);

    /// <summary>Writes a file (or the requested tail of it) in chunks, applying the cut, stall and corruption faults.</summary>
    private sealed class FileBytesResult(FakeHub hub, RepoFile file, string etag) : IResult
    {
        public async Task ExecuteAsync(HttpContext ctx)
        {
            var bytes = file.Bytes;
            if (hub.Corrupt.ContainsKey(file.Path))
            {
                bytes = (byte[])bytes.Clone();
                bytes[bytes.Length / 2] ^= 0xFF;
            }
            long start = 0;
            var range = ctx.Request.Headers.Range.FirstOrDefault();
            if (range is not null)
            {
                start = long.Parse(range["bytes=".Length..].TrimEnd('-'));
                if (start >= bytes.Length)
                {
                    ctx.Response.StatusCode = 416;
                    ctx.Response.Headers.ContentRange = $"bytes */{bytes.Length}";
                    return;
                }
                ctx.Response.StatusCode = 206;
                ctx.Response.Headers.ContentRange = $"bytes {start}-{bytes.Length - 1}/{bytes.Length}";
            }
            ctx.Response.Headers.ETag = etag;
            ctx.Response.Headers.AcceptRanges = "bytes";
            ctx.Response.ContentType = "application/octet-stream";
            ctx.Response.ContentLength = bytes.Length - start;

            long? cut = hub._cutOnce.TryRemove(file.Path, out var c) && c > start ? c : null;
            var stall = hub._stallOnce.TryRemove(file.Path, out var s) && s.Offset > start ? s : null;
            var position = start;
            while (position < bytes.Length)
            {
                var limit = Math.Min(bytes.Length, position + 64 * 1024);
                if (cut is { } cutAt && cutAt < limit) limit = cutAt;
                if (stall is not null && stall.Offset < limit) limit = stall.Offset;
                await ctx.Response.Body.WriteAsync(bytes.AsMemory((int)position, (int)(limit - position)), ctx.RequestAborted);
                position = limit;
                if (position == cut)
                {
                    await ctx.Response.Body.FlushAsync(ctx.RequestAborted);
                    ctx.Abort();
                    return;
                }
                if (stall is not null && position == stall.Offset)
                {
                    await ctx.Response.Body.FlushAsync(ctx.RequestAborted);
                    stall.Reached.TrySetResult();
                    await stall.Release.Task.WaitAsync(ctx.RequestAborted);
                    stall = null;
                }
            }
        }
    }

    public async ValueTask DisposeAsync()
    {
        foreach (var stall in _stallOnce.Values) stall.Release.TrySetResult();
        await _app.StopAsync();
        await _app.DisposeAsync();
    }
}
