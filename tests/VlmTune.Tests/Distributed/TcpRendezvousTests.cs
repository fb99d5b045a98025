using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using VlmTune.Distributed;

namespace VlmTune.Tests.Distributed;

/// <summary>Ranks as threads on 127.0.0.1; each test uses its own free port.</summary>
public class TcpRendezvousTests
{
    internal static int FreePort()
    {
        var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        var port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    private static Task<T> OnThread<T>(Func<T> body) =>
        Task.Factory.StartNew(body, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);

    /// <summary>Runs <paramref name="body"/> for each listed rank on its own thread, after joining the rendezvous.</summary>
    private static Task<T>[] Ranks<T>(int port, int world, TimeSpan timeout, IEnumerable<int> ranks, Func<TcpRendezvous, T> body, string host = "127.0.0.1") =>
        ranks.Select(r => OnThread(() =>
        {
            using var rdv = TcpRendezvous.Connect(host, port, r, world, timeout);
            return body(rdv);
        })).ToArray();

    private static async Task<DistributedException> Fails<T>(Task<T> task) => await Assert.ThrowsAsync<DistributedException>(() => task);

    [Fact]
    public async Task AllGatherAndSumGiveEveryRankTheSameAnswer()
    {
        var port = FreePort();
        var tasks = Ranks(port, 3, TimeSpan.FromSeconds(20), Enumerable.Range(0, 3), rdv =>
        {
            var parts = rdv.AllGather(Enumerable.Repeat((byte)(rdv.Rank + 1), rdv.Rank + 1).ToArray());
            var sum = rdv.AllReduceSum([rdv.Rank + 1.0, 0.1 * rdv.Rank]);
            return (Parts: parts.Select(p => Convert.ToHexString(p)).ToArray(), Sum: sum);
        });
        var results = await Task.WhenAll(tasks);
        Assert.All(results, r =>
        {
            Assert.Equal(["01", "0202", "030303"], r.Parts);
            Assert.Equal(6.0, r.Sum[0]);
        });
        // Added in rank order everywhere: bit-identical, not just close.
        Assert.Single(results.Select(r => BitConverter.DoubleToInt64Bits(r.Sum[1])).Distinct());
    }

    [Fact]
    public async Task FourRanksReceiveRankZerosPayloadAndPassBarriers()
    {
        var port = FreePort();
        var id = new byte[128];
        new Random(7).NextBytes(id);
        var tasks = Ranks(port, 4, TimeSpan.FromSeconds(20), Enumerable.Range(0, 4), rdv =>
        {
            var got = rdv.Broadcast(rdv.Rank == 0 ? id : null);
            rdv.Barrier();
            rdv.Barrier();
            var second = rdv.Broadcast(rdv.Rank == 0 ? [42] : null);
            return (rdv.Rank, got, second);
        });
        var results = await Task.WhenAll(tasks);
        Assert.Equal([0, 1, 2, 3], results.Select(r => r.Rank));
        Assert.All(results, r => Assert.Equal(id, r.got));
        Assert.All(results, r => Assert.Equal(new byte[] { 42 }, r.second));
    }

    [Fact]
    public async Task MasterReachableByHostName()
    {
        // "localhost" may resolve to ::1 before 127.0.0.1: rank 0 must accept either.
        var tasks = Ranks(FreePort(), 2, TimeSpan.FromSeconds(20), [0, 1], rdv => rdv.Broadcast(rdv.Rank == 0 ? [9] : null), host: "localhost");
        Assert.All(await Task.WhenAll(tasks), got => Assert.Equal(new byte[] { 9 }, got));
    }

    [Fact]
    public void PortInUseIsNamed()
    {
        var busy = new TcpListener(IPAddress.Any, 0);
        busy.Start();
        try
        {
            var port = ((IPEndPoint)busy.LocalEndpoint).Port;
            var e = Assert.Throws<DistributedException>(() => TcpRendezvous.Connect("127.0.0.1", port, 0, 2, TimeSpan.FromSeconds(5)));
            Assert.Contains($"cannot listen on port {port} (MASTER_PORT)", e.Message);
        }
        finally { busy.Stop(); }
    }

    [Fact]
    public void OneProcessNeedsNoSockets()
    {
        using var rdv = TcpRendezvous.Connect("unreachable.invalid", 1, 0, 1, TimeSpan.FromSeconds(1));
        Assert.Equal([1, 2], rdv.Broadcast([1, 2]));
        rdv.Barrier();
    }

    [Fact]
    public async Task RankThatNeverArrivesFailsEveryRankNamingIt()
    {
        var port = FreePort();
        var timeout = TimeSpan.FromSeconds(2);
        var clock = Stopwatch.StartNew();
        var tasks = Ranks(port, 4, timeout, [0, 1, 2], rdv => rdv.Broadcast(rdv.Rank == 0 ? [1] : null));
        foreach (var t in tasks)
        {
            var e = await Fails(t);
            Assert.Contains("rank(s) 3 of 4 never connected", e.Message);
        }
        // Bound, not a benchmark: rank 0 gives up at the timeout and tells the others at once.
        Assert.True(clock.Elapsed < timeout + TcpRendezvous.AbortGrace + TimeSpan.FromSeconds(5), $"took {clock.Elapsed}");
    }

    [Fact]
    public async Task ConnectionDroppedBeforeBarrierFailsTheOthersFast()
    {
        var port = FreePort();
        var timeout = TimeSpan.FromSeconds(60); // far longer than the test may take: only the drop can end it
        var clock = Stopwatch.StartNew();
        var tasks = Ranks(port, 4, timeout, Enumerable.Range(0, 4), rdv =>
        {
            rdv.Broadcast(rdv.Rank == 0 ? [0] : null);
            if (rdv.Rank == 2) return "died"; // Dispose closes its socket, as a crashed process's kernel does
            rdv.Barrier();
            return "passed";
        });
        Assert.Equal("died", await tasks[2]);
        foreach (var r in new[] { 0, 1, 3 })
        {
            var e = await Fails(tasks[r]);
            Assert.Contains("rank 2 disconnected", e.Message);
        }
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20), $"took {clock.Elapsed}");
    }

    [Fact]
    public async Task HungRankInBarrierFailsEveryOtherRankNamingIt()
    {
        var port = FreePort();
        var timeout = TimeSpan.FromSeconds(2);
        using var release = new ManualResetEventSlim();
        var tasks = Ranks(port, 3, timeout, Enumerable.Range(0, 3), rdv =>
        {
            rdv.Broadcast(rdv.Rank == 0 ? [0] : null);
            if (rdv.Rank == 1) { release.Wait(TimeSpan.FromSeconds(30)); return "hung"; } // alive but never arrives
            rdv.Barrier();
            return "passed";
        });
        foreach (var r in new[] { 0, 2 })
        {
            var e = await Fails(tasks[r]);
            Assert.Contains("rank(s) 1 of 3 did not arrive", e.Message);
        }
        release.Set();
        Assert.Equal("hung", await tasks[1]);
    }

    [Fact]
    public async Task DuplicateRankIsReported()
    {
        var port = FreePort();
        var tasks = Ranks(port, 3, TimeSpan.FromSeconds(3), [0, 1, 1], rdv => rdv.Broadcast(rdv.Rank == 0 ? [0] : null));
        var e0 = await Fails(tasks[0]);
        Assert.Contains("two processes connected as rank 1", e0.Message);
    }

    [Fact]
    public async Task AbortFromOneRankReachesTheOthers()
    {
        var port = FreePort();
        var tasks = Ranks(port, 3, TimeSpan.FromSeconds(30), Enumerable.Range(0, 3), rdv =>
        {
            if (rdv.Rank == 2) { rdv.Abort("out of memory"); return "aborted"; }
            rdv.Barrier();
            return "passed";
        });
        Assert.Equal("aborted", await tasks[2]);
        foreach (var r in new[] { 0, 1 })
            Assert.Contains("rank 2 aborted the job: out of memory", (await Fails(tasks[r])).Message);
    }
}
