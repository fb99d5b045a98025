using VlmTune.Inference;

namespace VlmTune.Tests.Support;

/// <summary>
/// Counts a stream's tokens on the engine's loop thread (an observer's Token comes before the token reaches any reader)
/// and holds the loop at the <c>pauseAt</c>-th one until <see cref="Resume"/>: what a test submits or cancels meanwhile
/// meets the stream with all its other tokens still to come. Waiting for a count on the test's side instead lets a
/// starved test thread (CI's 2 cores, parallel test classes) see the stream end first.
/// </summary>
public sealed class TokenGate(int pauseAt) : IGenerationObserver
{
    private readonly TaskCompletionSource _paused = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly ManualResetEventSlim _resume = new();
    private int _tokens;

    public int Tokens => Volatile.Read(ref _tokens);

    /// <summary>
    /// Returns once the loop is held at the pauseAt-th token; fails, instead of waiting for ever, when the stream
    /// (<paramref name="completion"/>) ends before it.
    /// </summary>
    public async Task PausedAsync(Task completion)
    {
        await Task.WhenAny(_paused.Task, completion);
        if (!_paused.Task.IsCompleted) throw new InvalidOperationException($"the stream ended after {Tokens} tokens, before token {pauseAt}");
    }

    public void Resume() => _resume.Set();

    public void Admitted() { }
    public void TilesEncoded(int tiles) { }
    public void Prefilled(int tokens) { }

    public void Token()
    {
        if (Interlocked.Increment(ref _tokens) != pauseAt) return;
        _paused.SetResult();
        if (!_resume.Wait(TimeSpan.FromMinutes(2))) throw new TimeoutException("the test never resumed the engine's loop");
    }
}
