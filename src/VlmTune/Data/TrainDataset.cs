namespace VlmTune.Data;

/// <summary>The samples of a run, with their lengths for length-grouped batching.</summary>
public sealed class TrainDataset
{
    public required IReadOnlyList<TrainingSample> Samples { get; init; }
    /// <summary>Signed token lengths (negative: text-only), one per sample.</summary>
    public required long[] Lengths { get; init; }

    /// <summary>
    /// Reads every data file, keeping the samples that can be trained on (others counted and warned about). Samples are
    /// measured (image headers, tokenisation) on <paramref name="threads"/> threads; their order is kept.
    /// </summary>
    public static TrainDataset Build(IReadOnlyList<string> dataFiles, string? imageRoot, SampleEncoder encoder, DataCounters counters, Action<string> warn, int threads = 1)
    {
        var samples = new List<TrainingSample>();
        var lengths = new List<long>();
        var entries = dataFiles.SelectMany(file => TrainingData.ReadEntries(file, imageRoot));
        var measured = entries.AsParallel().AsOrdered().WithDegreeOfParallelism(Math.Max(1, threads)).Select(entry =>
        {
            if (entry.Problem is { } problem)
            {
                if (problem.Kind is DataProblemKind.ImageMissing or DataProblemKind.ImageUndecodable) counters.AddBrokenImage();
                else counters.AddBadRecord();
                warn($"skipping {problem}");
                return ((TrainingSample?)null, (long?)null);
            }
            return (entry.Sample, encoder.MeasureLength(entry.Sample!));
        });
        try
        {
            foreach (var (sample, length) in measured)
            {
                if (sample is null || length is null) continue;
                samples.Add(sample);
                lengths.Add(length.Value);
            }
        }
        catch (AggregateException e) when (e.InnerExceptions.Count == 1)
        {
            // A data file that cannot be read at all (not found, not JSON lines/array/meta): report it as itself.
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(e.InnerExceptions[0]).Throw();
        }
        return new TrainDataset { Samples = samples, Lengths = lengths.ToArray() };
    }
}
