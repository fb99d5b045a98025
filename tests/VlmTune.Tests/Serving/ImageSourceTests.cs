using System.Net;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Logging;
using VlmTune.Serving;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Serving;

/// <summary>
/// Where images may come from. A loopback HTTP server stands in for the outside world (its network is explicitly
/// allowed); it redirects to private and metadata addresses, serves too much, and stalls.
/// </summary>
public sealed class ImageSourceTests(ServerFixture fixture) : IClassFixture<ServerFixture>, IAsyncLifetime
{
    private WebApplication? _world;
    private Uri _worldAddress = null!;

    public async Task InitializeAsync()
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.WebHost.ConfigureKestrel(k => k.Listen(IPAddress.Loopback, 0));
        _world = builder.Build();
        var clot = ServerFixture.Clot;
        _world.MapGet("/clot.jpg", () => Results.Bytes(clot, "image/jpeg"));
        _world.MapGet("/hop", () => Results.Redirect("/clot.jpg"));
        _world.MapGet("/to-private", () => Results.Redirect("http://10.1.2.3/clot.jpg"));
        _world.MapGet("/to-metadata", () => Results.Redirect("http://169.254.169.254/latest/meta-data/"));
        _world.MapGet("/to-localhost-name", (HttpContext c) => Results.Redirect($"http://localhost:{c.Connection.LocalPort}/clot.jpg"));
        _world.MapGet("/to-file", () => Results.Redirect("file:///etc/passwd"));
        _world.MapGet("/loop", () => Results.Redirect("/loop"));
        _world.MapGet("/missing", () => Results.NotFound());
        // No Content-Length: the size limit must hold while the body streams in.
        _world.MapGet("/huge", async (HttpContext c) =>
        {
            c.Response.ContentType = "image/jpeg";
            var block = new byte[64 * 1024];
            for (int i = 0; i < 64 && !c.RequestAborted.IsCancellationRequested; i++) await c.Response.Body.WriteAsync(block, c.RequestAborted);
        });
        _world.MapGet("/stall", async (HttpContext c) =>
        {
            c.Response.ContentType = "image/jpeg";
            await c.Response.Body.WriteAsync(clot.AsMemory(0, 100), c.RequestAborted);
            await c.Response.Body.FlushAsync(c.RequestAborted);
            await Task.Delay(TimeSpan.FromSeconds(30), c.RequestAborted);
        });
        await _world.StartAsync();
        _worldAddress = VlmTuneServer.Address(_world);
    }

    public async Task DisposeAsync()
    {
        if (_world is not null) { await _world.StopAsync(); await _world.DisposeAsync(); }
    }

    private ServerOptions Remote(params string[] networks) => new()
    {
        AllowRemoteImages = true, AllowedImageNetworks = networks, MaxImageBytes = 1024 * 1024, ImageFetchTimeoutSeconds = 2,
    };

    private static Task<HttpResponseMessage> Ask(TestServer server, string url) => server.PostAsync(TestServer.UserRequest("what is this?", [url], maxTokens: 2));

    [FixtureFact]
    public async Task RemoteImagesFollowTheRules()
    {
        await using var server = await fixture.StartAsync(Remote("127.0.0.1/32"));
        var world = _worldAddress.ToString().TrimEnd('/');
        Assert.Equal(200, (int)(await Ask(server, world + "/clot.jpg")).StatusCode);
        Assert.Equal(200, (int)(await Ask(server, world + "/hop")).StatusCode);

        var forbidden = new[] { "/to-private", "/to-metadata" };
        foreach (var path in forbidden)
            Assert.Equal("image_url_forbidden", (await ErrorAssert.IsError(await Ask(server, world + path), 400, "image_url")).GetProperty("code").GetString());
        await ErrorAssert.IsError(await Ask(server, world + "/to-file"), 400, "image_url");
        await ErrorAssert.IsError(await Ask(server, world + "/loop"), 400, "image_url");
        await ErrorAssert.IsError(await Ask(server, world + "/missing"), 400, "image_url");
        await ErrorAssert.IsError(await Ask(server, world + "/huge"), 400, "image_url");
        await ErrorAssert.IsError(await Ask(server, world + "/stall"), 400, "image_url");
        // Literal internal addresses are refused before connecting.
        foreach (var url in new[] { "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png", "http://[::1]/x.png", "http://[::ffff:127.0.0.2]/x.png", "http://0.0.0.0/x.png" })
            await ErrorAssert.IsError(await Ask(server, url), 400, "image_url");
    }

    [FixtureFact]
    public async Task LoopbackIsRefusedUnlessAllowedCheckedOnTheResolvedAddress()
    {
        await using var server = await fixture.StartAsync(Remote());
        var port = _worldAddress.Port;
        // "localhost" is a name: it is refused on the address it resolves to, not on its spelling.
        var error = await ErrorAssert.IsError(await Ask(server, $"http://localhost:{port}/clot.jpg"), 400, "image_url");
        Assert.Equal("image_url_forbidden", error.GetProperty("code").GetString());
        Assert.DoesNotContain("127.0.0.1", error.GetProperty("message").GetString());
        await ErrorAssert.IsError(await Ask(server, $"http://127.0.0.1:{port}/clot.jpg"), 400, "image_url");
    }

    [FixtureFact]
    public async Task LocalImagesStayInsideTheAllowedFolder()
    {
        var root = Directory.CreateTempSubdirectory("vlmtune-images-");
        var outside = Directory.CreateTempSubdirectory("vlmtune-outside-");
        try
        {
            File.WriteAllBytes(Path.Combine(root.FullName, "clot.jpg"), ServerFixture.Clot);
            Directory.CreateDirectory(Path.Combine(root.FullName, "sub"));
            File.WriteAllBytes(Path.Combine(root.FullName, "sub", "clot.jpg"), ServerFixture.Clot);
            File.WriteAllBytes(Path.Combine(outside.FullName, "secret.jpg"), ServerFixture.Clot);
            File.CreateSymbolicLink(Path.Combine(root.FullName, "escape.jpg"), Path.Combine(outside.FullName, "secret.jpg"));
            Directory.CreateSymbolicLink(Path.Combine(root.FullName, "linkdir"), outside.FullName);

            await using var server = await fixture.StartAsync(new ServerOptions { AllowLocalImages = root.FullName });
            Assert.Equal(200, (int)(await Ask(server, Path.Combine(root.FullName, "clot.jpg"))).StatusCode);
            Assert.Equal(200, (int)(await Ask(server, "sub/clot.jpg")).StatusCode);
            Assert.Equal(200, (int)(await Ask(server, new Uri(Path.Combine(root.FullName, "sub", "clot.jpg")).AbsoluteUri)).StatusCode);

            foreach (var bad in new[]
            {
                Path.Combine(outside.FullName, "secret.jpg"),             // outside
                root.FullName + "/../" + outside.Name + "/secret.jpg",    // .. escape
                "sub/../../" + outside.Name + "/secret.jpg",
                "escape.jpg",                                             // symlinked file
                "linkdir/secret.jpg",                                     // symlinked folder
                "missing.jpg",
                "/etc/passwd",
            })
            {
                var error = await ErrorAssert.IsError(await Ask(server, bad), 400, "image_url");
                Assert.DoesNotContain(outside.FullName, error.GetProperty("message").GetString());
                Assert.DoesNotContain(root.FullName, error.GetProperty("message").GetString());
            }
        }
        finally
        {
            root.Delete(true);
            outside.Delete(true);
        }
    }

    [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
    private static extern int mkfifo(string path, uint mode);

    /// <summary>
    /// Opening a FIFO for reading waits for a writer, forever: a FIFO (or socket) in the allowed folder, named directly
    /// or through a symlink, is refused without being opened, and the request thread is not held.
    /// </summary>
    [FixtureFact]
    public async Task NonRegularFilesInTheAllowedFolderAreRefusedWithoutBlocking()
    {
        var root = Directory.CreateTempSubdirectory("vlmtune-images-");
        try
        {
            var fifo = Path.Combine(root.FullName, "fifo.jpg");
            Assert.Equal(0, mkfifo(fifo, Convert.ToUInt32("600", 8)));
            File.CreateSymbolicLink(Path.Combine(root.FullName, "link.jpg"), fifo);
            Directory.CreateDirectory(Path.Combine(root.FullName, "folder.jpg"));
            using var socket = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified);
            socket.Bind(new System.Net.Sockets.UnixDomainSocketEndPoint(Path.Combine(root.FullName, "socket.jpg")));
            File.WriteAllBytes(Path.Combine(root.FullName, "clot.jpg"), ServerFixture.Clot);

            await using var server = await fixture.StartAsync(new ServerOptions { AllowLocalImages = root.FullName });
            foreach (var name in new[] { "fifo.jpg", "link.jpg", "folder.jpg", "socket.jpg" })
            {
                using var patience = new CancellationTokenSource(TimeSpan.FromSeconds(30));
                var body = System.Text.Json.JsonSerializer.Serialize(TestServer.UserRequest("what is this?", [name], maxTokens: 2));
                var asking = server.PostJsonAsync(body, cancellation: patience.Token);
                try
                {
                    var error = await ErrorAssert.IsError(await asking, 400, "image_url");
                    Assert.DoesNotContain(root.FullName, error.GetProperty("message").GetString());
                }
                catch (TaskCanceledException) when (name is "fifo.jpg" or "link.jpg")
                {
                    // Release the server thread blocked in open(), then fail.
                    using (File.OpenWrite(fifo)) { }
                    Assert.Fail($"{name}: the request blocked on the FIFO");
                }
            }
            Assert.Equal(200, (int)(await Ask(server, "clot.jpg")).StatusCode);
        }
        finally { root.Delete(true); }
    }

    [Fact]
    public void InternalAddressesAreRecognised()
    {
        foreach (var a in new[] { "127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.100.100.200", "0.0.0.0", "::1", "fe80::1", "fd00:ec2::254", "::ffff:10.0.0.1", "224.0.0.1" })
            Assert.True(RemoteImageFetcher.IsInternal(IPAddress.Parse(a)), a);
        foreach (var a in new[] { "8.8.8.8", "1.1.1.1", "172.32.0.1", "2606:4700:4700::1111" })
            Assert.False(RemoteImageFetcher.IsInternal(IPAddress.Parse(a)), a);
    }
}
