using System.Diagnostics;

namespace VlmTune.Hub;

/// <summary>
/// An exclusive lock on a file shared by processes and threads: an open <see cref="FileStream"/> with
/// <see cref="FileShare.None"/> (an advisory <c>flock</c> on Unix, which the kernel drops when the holder dies, even by
/// <c>kill -9</c>). The lock file itself stays; only holding it open means anything.
/// </summary>
internal sealed class FileLock : IDisposable
{
    private static readonly TimeSpan PollInterval = TimeSpan.FromMilliseconds(100);
    private readonly FileStream _stream;

    private FileLock(FileStream stream) => _stream = stream;

    public static async Task<FileLock> AcquireAsync(string path, TimeSpan timeout, Action? onWaiting, CancellationToken ct)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        var waited = Stopwatch.StartNew();
        var told = false;
        while (true)
        {
            IOException busy;
            try
            {
                return new FileLock(new FileStream(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None));
            }
            catch (IOException e) { busy = e; }

            if (waited.Elapsed >= timeout)
                throw new HubDownloadException(
                    $"Gave up after {timeout.TotalSeconds:0} s waiting for the lock {path}: another download of the same " +
                    $"file is running ({busy.Message}). Wait for it to finish, or if none runs, rerun.");
            if (!told) { onWaiting?.Invoke(); told = true; }
            await Task.Delay(PollInterval, ct);
        }
    }

    public void Dispose() => _stream.Dispose();
}
