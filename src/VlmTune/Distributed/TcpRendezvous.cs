using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;

namespace VlmTune.Distributed;

/// <summary>
/// The control plane of a data-parallel job, on plain TCP: rank 0 listens on MASTER_ADDR:MASTER_PORT, every other rank
/// connects and says who it is, and rank 0 relays small collectives (broadcast of the NCCL unique id, barriers).
/// NCCL carries the tensors; this only lets ranks find each other and notice when one is gone.
/// Failure detection: a rank that does not arrive in time, or whose connection drops, ends every rank's current call
/// with a <see cref="DistributedException"/> naming that rank (rank 0 tells the others before it throws).
/// Messages are [int32 length][byte kind][body], little-endian.
/// </summary>
public sealed class TcpRendezvous : IDisposable
{
    private enum Kind : byte { Hello = 1, Payload = 2, BarrierArrive = 3, BarrierRelease = 4, Abort = 5, Contribute = 6, Gathered = 7 }

    private const int MaxMessageBytes = 64 << 20;

    /// <summary>The most one rank may contribute to one <see cref="AllGather"/> of the whole world (rank 0 relays all parts in one message).</summary>
    public const int MaxPayloadBytes = (MaxMessageBytes >> 1) - 1024;

    /// <summary>
    /// Extra time a non-master rank waits beyond <see cref="Timeout"/>, so rank 0's verdict naming the culprit
    /// reaches it before its own, less informative, deadline fires.
    /// </summary>
    public static readonly TimeSpan AbortGrace = TimeSpan.FromSeconds(2);

    public int Rank { get; }
    public int WorldSize { get; }
    public TimeSpan Timeout { get; }

    // Rank 0: one stream per other rank (index = rank; [0] unused). Other ranks: the stream to rank 0.
    private readonly NetworkStream?[] _peers;
    private readonly NetworkStream? _master;
    private bool _failed;

    private TcpRendezvous(int rank, int worldSize, TimeSpan timeout, NetworkStream?[] peers, NetworkStream? master)
    {
        Rank = rank; WorldSize = worldSize; Timeout = timeout; _peers = peers; _master = master;
    }

    public static TcpRendezvous Connect(DistributedEnvironment env, TimeSpan timeout) =>
        Connect(env.MasterAddress, env.MasterPort, env.Rank, env.WorldSize, timeout);

    /// <summary>Joins the job: returns once every rank has connected to rank 0, or throws naming the missing ranks.</summary>
    public static TcpRendezvous Connect(string masterAddress, int masterPort, int rank, int worldSize, TimeSpan timeout)
    {
        if (worldSize < 1) throw new ArgumentOutOfRangeException(nameof(worldSize), worldSize, "world size must be >= 1");
        if (rank < 0 || rank >= worldSize) throw new ArgumentOutOfRangeException(nameof(rank), rank, $"rank must be in [0, {worldSize})");
        if (worldSize == 1) return new TcpRendezvous(0, 1, timeout, [null], null);
        return rank == 0
            ? AcceptAllAsync(masterAddress, masterPort, worldSize, timeout).GetAwaiter().GetResult()
            : JoinAsync(masterAddress, masterPort, rank, worldSize, timeout).GetAwaiter().GetResult();
    }

    private static async Task<TcpRendezvous> AcceptAllAsync(string address, int port, int worldSize, TimeSpan timeout)
    {
        var peers = new NetworkStream?[worldSize];
        using var cts = new CancellationTokenSource(timeout);
        // All interfaces, IPv4 and IPv6 where the host has it: MASTER_ADDR names this host as the others see it
        // (e.g. "localhost" may resolve to ::1 first), so binding to one of its addresses would be fragile.
        TcpListener listener;
        try { listener = TcpListener.Create(port); }
        catch (SocketException) { listener = new TcpListener(IPAddress.Any, port); }
        listener.Server.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
        try { listener.Start(worldSize); }
        catch (SocketException e)
        {
            throw new DistributedException($"rank 0 cannot listen on port {port} (MASTER_PORT) of {address}: {e.Message}. Pick a free port.", e);
        }
        DistributedException? bad = null;
        try
        {
            while (bad is null && peers.Skip(1).Any(p => p is null))
            {
                Socket socket;
                try { socket = await listener.AcceptSocketAsync(cts.Token); }
                catch (OperationCanceledException) { break; }
                socket.NoDelay = true;
                // ownsSocket: disposing the stream must close the connection, which is how peers learn we are gone.
                // Handshakes run one at a time: every rank sends its hello right after connecting.
                try { await HandshakeAsync(new NetworkStream(socket, ownsSocket: true), peers, worldSize, cts.Token); }
                catch (OperationCanceledException) { break; }
                catch (Exception e) when (e is IOException or SocketException) { } // a connection that went away before saying who it is
                catch (DistributedException e) { bad = e; }
            }
            var missing = Enumerable.Range(1, worldSize - 1).Where(r => peers[r] is null).ToList();
            if (bad is not null || missing.Count > 0)
            {
                var message = bad?.Message ??
                    $"rendezvous on {address}:{port} timed out after {timeout.TotalSeconds:0.#} s: rank(s) {string.Join(", ", missing)} of {worldSize} never connected. " +
                    "Check that every rank was started with the same MASTER_ADDR/MASTER_PORT/WORLD_SIZE and can reach rank 0.";
                var partial = new TcpRendezvous(0, worldSize, timeout, peers, null);
                partial.AbortAll(message);
                partial.Dispose();
                throw new DistributedException(message, bad);
            }
            return new TcpRendezvous(0, worldSize, timeout, peers, null);
        }
        finally { listener.Stop(); }
    }

    private static async Task HandshakeAsync(NetworkStream stream, NetworkStream?[] peers, int worldSize, CancellationToken ct)
    {
        var (kind, body) = await ReadAsync(stream, ct);
        if (kind != Kind.Hello || body.Length != 8) { stream.Dispose(); return; } // not one of ours: ignore the stranger
        var rank = BinaryPrimitives.ReadInt32LittleEndian(body);
        var theirWorld = BinaryPrimitives.ReadInt32LittleEndian(body.AsSpan(4));
        string? problem = null;
        lock (peers)
        {
            if (theirWorld != worldSize) problem = $"rank {rank} was started with WORLD_SIZE={theirWorld}, rank 0 with {worldSize}";
            else if (rank < 1 || rank >= worldSize) problem = $"a process connected as rank {rank}, outside 1..{worldSize - 1}";
            else if (peers[rank] is not null) problem = $"two processes connected as rank {rank}; RANK must be unique";
            else peers[rank] = stream;
        }
        if (problem is not null)
        {
            try { await WriteAsync(stream, Kind.Abort, System.Text.Encoding.UTF8.GetBytes(problem), CancellationToken.None); } catch { }
            stream.Dispose();
            throw new DistributedException(problem);
        }
    }

    private static async Task<TcpRendezvous> JoinAsync(string address, int port, int rank, int worldSize, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        Exception? last = null;
        while (DateTime.UtcNow < deadline)
        {
            var socket = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
            try
            {
                using var attempt = new CancellationTokenSource(TimeSpan.FromSeconds(2));
                await socket.ConnectAsync(address, port, attempt.Token);
                var stream = new NetworkStream(socket, ownsSocket: true);
                var hello = new byte[8];
                BinaryPrimitives.WriteInt32LittleEndian(hello, rank);
                BinaryPrimitives.WriteInt32LittleEndian(hello.AsSpan(4), worldSize);
                await WriteAsync(stream, Kind.Hello, hello, CancellationToken.None);
                return new TcpRendezvous(rank, worldSize, timeout, [], stream);
            }
            catch (Exception e) when (e is SocketException or OperationCanceledException or IOException)
            {
                last = e;
                socket.Dispose();
                await Task.Delay(100); // rank 0 may not be listening yet
            }
        }
        throw new DistributedException(
            $"rank {rank} could not reach rank 0 at {address}:{port} (MASTER_ADDR:MASTER_PORT) within {timeout.TotalSeconds:0.#} s: {last?.Message}", last);
    }

    /// <summary>Rank 0's <paramref name="payload"/> (e.g. the 128-byte NCCL unique id) delivered to every rank; others pass null.</summary>
    public byte[] Broadcast(byte[]? payload)
    {
        ThrowIfFailed();
        if (Rank == 0)
        {
            ArgumentNullException.ThrowIfNull(payload);
            if (WorldSize > 1) Guard(() => SendToAllAsync(Kind.Payload, payload));
            return payload;
        }
        return Guard(async () => await ReceiveFromMasterAsync(Kind.Payload));
    }

    /// <summary>Returns on every rank once all ranks have entered it; throws naming a rank that left or is late.</summary>
    public void Barrier()
    {
        ThrowIfFailed();
        if (WorldSize == 1) return;
        if (Rank == 0)
        {
            Guard(async () =>
            {
                await GatherAsync(Kind.BarrierArrive, "barrier");
                await SendToAllAsync(Kind.BarrierRelease, []);
            });
        }
        else
        {
            Guard(async () =>
            {
                await WriteAsync(_master!, Kind.BarrierArrive, [], CancellationToken.None);
                await ReceiveFromMasterAsync(Kind.BarrierRelease);
            });
        }
    }

    /// <summary>
    /// Every rank's <paramref name="mine"/>, indexed by rank, delivered to every rank (rank 0 collects and relays). For the
    /// small host-side values a step agrees on (token counts, losses, a NaN verdict) and for CPU-only gradient reduction.
    /// </summary>
    public byte[][] AllGather(byte[] mine)
    {
        ArgumentNullException.ThrowIfNull(mine);
        ThrowIfFailed();
        if (WorldSize == 1) return [mine];
        if (Rank == 0)
        {
            return Guard(async () =>
            {
                var all = await GatherAsync(Kind.Contribute, "all-gather");
                all[0] = mine;
                await SendToAllAsync(Kind.Gathered, Pack(all));
                return all;
            });
        }
        return Guard(async () =>
        {
            await WriteAsync(_master!, Kind.Contribute, mine, CancellationToken.None);
            return Unpack(await ReceiveFromMasterAsync(Kind.Gathered), WorldSize);
        });
    }

    /// <summary>Element-wise sum over ranks, added in rank order on every rank so all get the bit-identical result.</summary>
    public double[] AllReduceSum(ReadOnlySpan<double> values)
    {
        var parts = AllGather(System.Runtime.InteropServices.MemoryMarshal.AsBytes(values).ToArray());
        var sum = new double[values.Length];
        foreach (var part in parts)
        {
            var v = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, double>(part);
            if (v.Length != sum.Length) throw new DistributedException($"all-reduce: ranks contributed {v.Length} and {sum.Length} values; every rank must make the same calls.");
            for (int i = 0; i < sum.Length; i++) sum[i] += v[i];
        }
        return sum;
    }

    private static byte[] Pack(byte[][] parts)
    {
        var packed = new byte[parts.Sum(p => 4 + p.Length)];
        int at = 0;
        foreach (var p in parts)
        {
            BinaryPrimitives.WriteInt32LittleEndian(packed.AsSpan(at), p.Length);
            p.CopyTo(packed, at + 4);
            at += 4 + p.Length;
        }
        return packed;
    }

    private static byte[][] Unpack(byte[] packed, int count)
    {
        var parts = new byte[count][];
        int at = 0;
        for (int r = 0; r < count; r++)
        {
            int length = BinaryPrimitives.ReadInt32LittleEndian(packed.AsSpan(at));
            parts[r] = packed.AsSpan(at + 4, length).ToArray();
            at += 4 + length;
        }
        return parts;
    }

    /// <summary>Ends the job on every rank with <paramref name="reason"/> (e.g. this rank's own fatal error).</summary>
    public void Abort(string reason)
    {
        if (_failed) return;
        _failed = true;
        var message = $"rank {Rank} aborted the job: {reason}";
        if (Rank == 0) AbortAll(message);
        else try { WriteAsync(_master!, Kind.Abort, System.Text.Encoding.UTF8.GetBytes(message), CancellationToken.None).Wait(1000); } catch { }
    }

    /// <summary>Each other rank's next message body, indexed by rank ([0] empty for the caller to fill).</summary>
    private async Task<byte[][]> GatherAsync(Kind expected, string what)
    {
        var bodies = new byte[WorldSize][];
        bodies[0] = [];
        using var cts = new CancellationTokenSource(Timeout);
        var pending = Enumerable.Range(1, WorldSize - 1).ToDictionary(r => ReadAsync(_peers[r]!, cts.Token), r => r);
        while (pending.Count > 0)
        {
            var done = await Task.WhenAny(pending.Keys);
            var rank = pending[done];
            pending.Remove(done);
            if (done.IsCanceled || (done.IsFaulted && cts.IsCancellationRequested))
            {
                var late = pending.Values.Append(rank).Order();
                throw new DistributedException($"{what} timed out after {Timeout.TotalSeconds:0.#} s: rank(s) {string.Join(", ", late)} of {WorldSize} did not arrive (hung or too slow).");
            }
            if (done.IsFaulted)
                throw new DistributedException($"rank {rank} disconnected during {what} (process died or network failed): {done.Exception!.InnerException!.Message}");
            var (kind, body) = done.Result;
            if (kind == Kind.Abort) throw new DistributedException(System.Text.Encoding.UTF8.GetString(body));
            if (kind != expected) throw new DistributedException($"rank {rank} is out of step: sent {kind} during {what}; every rank must make the same collective calls in the same order.");
            bodies[rank] = body;
        }
        return bodies;
    }

    private async Task SendToAllAsync(Kind kind, byte[] body)
    {
        for (var r = 1; r < WorldSize; r++)
        {
            try { await WriteAsync(_peers[r]!, kind, body, CancellationToken.None); }
            catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException)
            {
                throw new DistributedException($"rank {r} disconnected (process died or network failed): {e.Message}", e);
            }
        }
    }

    private async Task<byte[]> ReceiveFromMasterAsync(Kind expected)
    {
        using var cts = new CancellationTokenSource(Timeout + AbortGrace);
        (Kind Kind, byte[] Body) message;
        try { message = await ReadAsync(_master!, cts.Token); }
        catch (OperationCanceledException)
        {
            throw new DistributedException($"rank {Rank} waited {(Timeout + AbortGrace).TotalSeconds:0.#} s for rank 0 without an answer: rank 0 is hung or unreachable.");
        }
        catch (Exception e) when (e is IOException or SocketException or EndOfStreamException)
        {
            throw new DistributedException($"rank 0 disconnected (process died or network failed); rank {Rank} cannot continue: {e.Message}", e);
        }
        if (message.Kind == Kind.Abort) throw new DistributedException(System.Text.Encoding.UTF8.GetString(message.Body));
        if (message.Kind != expected) throw new DistributedException($"rank {Rank} expected {expected} from rank 0 but got {message.Kind}; ranks are out of step.");
        return message.Body;
    }

    /// <summary>Runs a collective; on failure rank 0 tells every other rank why, and this object refuses further calls.</summary>
    private T Guard<T>(Func<Task<T>> body)
    {
        try { return body().GetAwaiter().GetResult(); }
        catch (DistributedException e)
        {
            _failed = true;
            if (Rank == 0) AbortAll(e.Message);
            throw;
        }
    }

    private void Guard(Func<Task> body) => Guard(async () => { await body(); return 0; });

    private void AbortAll(string message)
    {
        var bytes = System.Text.Encoding.UTF8.GetBytes(message);
        for (var r = 1; r < _peers.Length; r++)
        {
            if (_peers[r] is not { } peer) continue;
            try { WriteAsync(peer, Kind.Abort, bytes, CancellationToken.None).Wait(1000); } catch { } // a dead peer cannot be told
        }
    }

    private void ThrowIfFailed()
    {
        if (_failed) throw new DistributedException($"rank {Rank}: the rendezvous already failed; the job must be restarted.");
    }

    private static async Task WriteAsync(NetworkStream stream, Kind kind, byte[] body, CancellationToken ct)
    {
        var frame = new byte[5 + body.Length];
        BinaryPrimitives.WriteInt32LittleEndian(frame, body.Length + 1);
        frame[4] = (byte)kind;
        body.CopyTo(frame, 5);
        await stream.WriteAsync(frame, ct);
        await stream.FlushAsync(ct);
    }

    private static async Task<(Kind Kind, byte[] Body)> ReadAsync(NetworkStream stream, CancellationToken ct)
    {
        var header = new byte[5];
        await stream.ReadExactlyAsync(header, ct); // EndOfStreamException when the peer is gone
        var length = BinaryPrimitives.ReadInt32LittleEndian(header);
        if (length < 1 || length > MaxMessageBytes) throw new IOException($"malformed rendezvous message (length {length})");
        var body = new byte[length - 1];
        await stream.ReadExactlyAsync(body, ct);
        return ((Kind)header[4], body);
    }

    public void Dispose()
    {
        foreach (var p in _peers) p?.Dispose();
        _master?.Dispose();
    }
}
