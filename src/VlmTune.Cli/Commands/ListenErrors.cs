using System.Net;
using System.Net.Sockets;
using Microsoft.AspNetCore.Builder;

namespace VlmTune.Cli.Commands;

/// <summary>
/// Starts a command's web host (<c>serve</c>, <c>data browse</c>); the ways binding fails become one line naming the
/// fix instead of Kestrel's exception chain.
/// </summary>
internal static class ListenErrors
{
    public static async Task StartAsync(WebApplication app, string host, int port)
    {
        try { await app.StartAsync(); }
        catch (Exception e) when (Explain(e, host, port) is { } clear) { throw clear; }
    }

    /// <summary>
    /// Binds and releases <paramref name="host"/>:<paramref name="port"/> before a slow start (loading a model), so a
    /// port in use is said in a moment, not after the weights are read. The real bind is still checked.
    /// </summary>
    public static void ThrowIfUnavailable(string host, int port)
    {
        if (port == 0 || !(host == "localhost" || IPAddress.TryParse(host, out _))) return;
        var address = host == "localhost" ? IPAddress.Loopback : IPAddress.Parse(host);
        try
        {
            using var probe = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
            probe.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);   // as Kestrel binds
            probe.Bind(new IPEndPoint(address, port));
        }
        catch (SocketException e) when (Explain(e, host, port) is { } clear) { throw clear; }
    }

    private static VlmTuneException? Explain(Exception e, string host, int port)
    {
        if (Find<Microsoft.AspNetCore.Connections.AddressInUseException>(e) is not null || Find<SocketException>(e) is { SocketErrorCode: SocketError.AddressAlreadyInUse })
            return new(FreePortNear(host, port) is { } free
                ? $"port {port} is in use on {host}; pass --port {free} (free now), or stop what listens there."
                : $"port {port} is in use on {host}; pass --port 0 for any free port, or stop what listens there.");
        return Find<SocketException>(e)?.SocketErrorCode switch
        {
            SocketError.AddressNotAvailable => new($"--host {host} is not an address of this machine; pass one of its addresses, 127.0.0.1 or 0.0.0.0 (all)."),
            SocketError.AccessDenied => new($"port {port} on {host} needs privileges this process lacks; pass a --port above 1023."),
            _ => Find<IOException>(e) is { } io ? new($"cannot listen on {host}:{port}: {io.Message}") : null,
        };
    }

    /// <summary>The first port after <paramref name="port"/> that binds on the same address now: a hint, not a promise.</summary>
    internal static int? FreePortNear(string host, int port)
    {
        var address = host == "localhost" ? IPAddress.Loopback : IPAddress.TryParse(host, out var ip) ? ip : IPAddress.Loopback;
        for (int candidate = port + 1; candidate <= Math.Min(port + 100, IPEndPoint.MaxPort); candidate++)
        {
            try
            {
                using var probe = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
                probe.Bind(new IPEndPoint(address, candidate));
                return candidate;
            }
            catch (SocketException) { }
        }
        return null;
    }

    private static T? Find<T>(Exception? e) where T : Exception
    {
        for (; e is not null; e = e.InnerException) if (e is T found) return found;
        return null;
    }
}
