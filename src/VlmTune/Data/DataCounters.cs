namespace VlmTune.Data;

/// <summary>Counts of what the data pipeline left out or the trainer skipped; updated from worker threads.</summary>
public sealed class DataCounters
{
    private long _badRecords, _brokenImages, _tooLong, _labelMismatch, _nanSkipped;

    /// <summary>Records that are not valid samples (bad JSON, wrong fields, image paths outside the root, ...).</summary>
    public long BadRecords => Interlocked.Read(ref _badRecords);
    /// <summary>Samples skipped because an image is missing or cannot be decoded.</summary>
    public long BrokenImages => Interlocked.Read(ref _brokenImages);
    /// <summary>Samples dropped because the maximum length would cut their image tokens.</summary>
    public long TooLong => Interlocked.Read(ref _tooLong);
    /// <summary>Samples whose labels the official tokenisation masks entirely ("tokenization mismatch").</summary>
    public long LabelMismatch => Interlocked.Read(ref _labelMismatch);
    /// <summary>Micro-batches or optimizer steps skipped for a non-finite loss or gradient norm (nan_policy: skip).</summary>
    public long NanSkipped => Interlocked.Read(ref _nanSkipped);

    internal void AddBadRecord() => Interlocked.Increment(ref _badRecords);
    internal void AddBrokenImage() => Interlocked.Increment(ref _brokenImages);
    internal void AddTooLong() => Interlocked.Increment(ref _tooLong);
    internal void AddLabelMismatch() => Interlocked.Increment(ref _labelMismatch);
    internal void AddNanSkipped() => Interlocked.Increment(ref _nanSkipped);

    internal void Restore(long bad, long broken, long tooLong, long mismatch, long nan)
    {
        _badRecords = bad; _brokenImages = broken; _tooLong = tooLong; _labelMismatch = mismatch; _nanSkipped = nan;
    }

    public override string ToString() =>
        $"bad records: {BadRecords}, broken images: {BrokenImages}, too long: {TooLong}, label mismatch: {LabelMismatch}, non-finite skipped: {NanSkipped}";
}
