using VlmTune.Cuda;

namespace VlmTune.Tests.Cuda;

/// <summary>
/// libtorch reads its attention backend order from the C environment at its first attention call; the CLI sets it at
/// start-up. The variables are process state, so one test covers the order of events in this process.
/// </summary>
public sealed class AttentionBackendsTests
{
    [Fact]
    public void ConfigureSetsTheCEnvironmentOnceAndKeepsWhatIsThere()
    {
        if (OperatingSystem.IsWindows()) return;
        // Nothing else in the test process sets them; a value in the environment the tests started with is kept.
        string? deprioritized = AttentionBackends.Read(AttentionBackends.DeprioritizedVariable);
        string? preferred = AttentionBackends.Read(AttentionBackends.PreferredVariable);
        AttentionBackends.Configure(cudnn: false);
        Assert.Equal(deprioritized ?? "1", AttentionBackends.Read(AttentionBackends.DeprioritizedVariable));
        Assert.Equal(preferred ?? "0", AttentionBackends.Read(AttentionBackends.PreferredVariable));
        // .NET's own copy of the environment is not where libtorch looks: the value is in the C environment only.
        if (deprioritized is null) Assert.Null(Environment.GetEnvironmentVariable(AttentionBackends.DeprioritizedVariable));
        // Set already (by the user, or an earlier call): kept.
        AttentionBackends.Configure(cudnn: true);
        Assert.Equal(deprioritized ?? "1", AttentionBackends.Read(AttentionBackends.DeprioritizedVariable));
        Assert.Equal(preferred ?? "0", AttentionBackends.Read(AttentionBackends.PreferredVariable));
    }
}
