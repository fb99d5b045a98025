using VlmTune.Text;
using VlmTune.Vision;

namespace VlmTune.Data;

/// <summary>A dataset's summary: <see cref="ValidationReport"/>'s counts in one shape for <c>data validate --json</c> and the browser.</summary>
public sealed record DataSummary(
    long Records, long Samples, long Images, long Errors,
    IReadOnlyDictionary<string, long> ErrorsByKind,
    IReadOnlyList<ProblemFact> Problems,
    int? MaxLength, long? TooLong, int Measured, LengthStats? Lengths,
    IReadOnlyDictionary<int, long> ImagesPerSample, IReadOnlyDictionary<int, long> TilesPerImage,
    bool Complete, string? ScanError)
{
    public const int HistogramBins = 20;

    /// <param name="complete">Whether every record has been counted (the browser counts in the background).</param>
    public static DataSummary Of(ValidationReport report, ValidationOptions options, bool complete = true, string? scanError = null)
    {
        var lengths = report.Lengths.Count == 0 ? null : LengthStats.Of(report);
        return new DataSummary(report.Records, report.Samples, report.Images, report.ErrorCount,
            report.ErrorsByKind.OrderByDescending(p => p.Value).ToDictionary(p => p.Key.ToString(), p => p.Value),
            report.Problems.Select(ProblemFact.Of).ToList(),
            options.MaxLength, options.Length is null ? null : report.TooLong, report.Lengths.Count, lengths,
            new SortedDictionary<int, long>(report.ImagesPerSample), new SortedDictionary<int, long>(report.TilesPerImage),
            complete, scanError);
    }
}

/// <summary>Length percentiles and a histogram of <see cref="DataSummary.HistogramBins"/> equal bins from 0 to the longest.</summary>
public sealed record LengthStats(int P50, int P90, int P99, int Max, int BinWidth, IReadOnlyList<long> Histogram)
{
    public static LengthStats Of(ValidationReport report)
    {
        var max = report.Lengths.Max();
        var width = Math.Max(1, (int)Math.Ceiling((max + 1) / (double)DataSummary.HistogramBins));
        var bins = new long[DataSummary.HistogramBins];
        foreach (var n in report.Lengths) bins[Math.Min(bins.Length - 1, n / width)]++;
        return new LengthStats(report.Percentile(50), report.Percentile(90), report.Percentile(99), max, width, bins);
    }
}

public sealed record ProblemFact(string Kind, string File, long Line, long Record, string Message)
{
    public static ProblemFact Of(DataProblem p) => new(p.Kind.ToString(), p.Source.File, p.Source.Line, p.Source.Index, p.Message);
}

/// <summary>One record as the list shows it: the sample (or its problem) with validation's facts.</summary>
public sealed record BrowsedSample(long Index, SampleFacts Facts)
{
    public TrainingSample? Sample => Facts.Entry.Sample;
    public SampleSource Source => Facts.Entry.Sample?.Source ?? Facts.Entry.Problem!.Source;
}

/// <summary>A page of records.</summary>
/// <param name="Matched">Records that match a filter or search (so far, when not <paramref name="Complete"/>); null without one (the summary counts them all).</param>
/// <param name="Complete">False while the problem filter only knows the records counted so far.</param>
public sealed record SamplePage(IReadOnlyList<BrowsedSample> Samples, long? Matched, bool Complete);

/// <summary>A run of consecutive tokens that are all learned or all masked (image tokens collapsed to a count).</summary>
public sealed record TokenSpan(string Text, bool Learned, int Tokens, bool Image);

/// <summary>How training tokenizes a sample: counts, truncation and which text the labels supervise.</summary>
public sealed record SampleTokens(int TextTokens, int ImageTokens, int FullLength, int? MaxLength, bool Truncated,
                                  int SupervisedTokens, bool LabelsMaskedForMismatch, IReadOnlyList<TokenSpan> Spans, string? Problem);

/// <summary>One record in full: its facts, the tile grid of each image, and the tokens when a model was given.</summary>
public sealed record SampleDetail(BrowsedSample Sample, IReadOnlyList<TileGrid?> Grids, SampleTokens? Tokens);

/// <summary>
/// A dataset to look at, in any format training reads: pages of records with exactly the facts <c>data validate</c>
/// finds (<see cref="DataValidator.Check(IEnumerable{DataEntry}, ValidationOptions)"/>), one record's tokens and labels
/// as training makes them, and the summary, counted in the background so the first page never waits for it. Records
/// are streamed from the file on each request; only a few numbers per record stay in memory.
/// </summary>
public sealed class DatasetBrowser : IDisposable
{
    private const int SniffRecords = 100;
    private readonly Func<IEnumerable<DataEntry>> _read;
    private readonly ValidationReport _report = new();
    private readonly List<bool> _hasProblem = new();
    private readonly object _lock = new();
    private readonly CancellationTokenSource _stop = new();
    private readonly ManualResetEventSlim? _holdAfterFirstBatch;
    private string? _scanError;
    private volatile bool _complete;

    public string Path { get; }
    public ValidationOptions Options { get; }
    public Task Scan { get; }

    private DatasetBrowser(string path, Func<IEnumerable<DataEntry>> read, ValidationOptions options, ManualResetEventSlim? holdAfterFirstBatch)
    {
        Path = path;
        _read = read;
        Options = options;
        _holdAfterFirstBatch = holdAfterFirstBatch;
        Scan = Task.Run(RunScan);
    }

    /// <summary>Opens a dataset; a file that is not training data is one clear error here, not on the page.</summary>
    /// <param name="holdAfterFirstBatch">Tests: the background count stops after its first batch until this is set.</param>
    public static DatasetBrowser Open(string path, string? imageRoot, ValidationOptions options, ManualResetEventSlim? holdAfterFirstBatch = null)
    {
        var full = System.IO.Path.GetFullPath(path);
        IEnumerable<DataEntry> Read() => TrainingData.ReadEntries(full, imageRoot);
        // Not JSON at the start, or nothing like a sample among the first records: the wrong file, not broken data.
        var head = Read().Take(SniffRecords).ToList();
        if (head.Count == 0) throw new VlmTuneException($"{full} holds no records; it is not training data.");
        if (head[0].Problem is { Kind: DataProblemKind.BadJson } problem)
            throw new VlmTuneException($"{full} is not training data: {problem.Message} (line {problem.Source.Line})");
        if (head.All(e => e.Sample is null))
            throw new VlmTuneException($"{full} is not training data: none of its first {head.Count} record(s) is a sample (line {head[0].Problem!.Source.Line}: {head[0].Problem!.Message})");
        return new DatasetBrowser(full, Read, options, holdAfterFirstBatch);
    }

    public bool Complete => _complete;

    /// <summary>The counts so far (<see cref="DataSummary.Complete"/> once every record is in).</summary>
    public DataSummary Summary()
    {
        lock (_lock) return DataSummary.Of(_report, Options, _complete, _scanError);
    }

    /// <summary>
    /// Records <paramref name="offset"/>.. of those that match: all, those with problems (as far as the background count
    /// has got: <see cref="SamplePage.Complete"/> says when it is done), and those whose id or turns contain
    /// <paramref name="search"/> (case-insensitive).
    /// </summary>
    public SamplePage Page(int offset, int limit, bool problemsOnly = false, string? search = null, CancellationToken ct = default)
    {
        if (offset < 0 || limit < 1 || limit > 200) throw new VlmTuneException($"offset must be >= 0 and limit 1..200, got offset {offset}, limit {limit}");
        search = string.IsNullOrWhiteSpace(search) ? null : search.Trim();
        bool[]? problems = null;
        bool complete = true;
        if (problemsOnly)
            lock (_lock) { problems = _hasProblem.ToArray(); complete = _complete; }

        var page = new List<(long Index, DataEntry Entry)>();
        long matched = 0, index = -1;
        var needCount = problemsOnly || search is not null;
        foreach (var entry in _read())
        {
            ct.ThrowIfCancellationRequested();
            index++;
            if (problems is not null && (index >= problems.Length || !problems[index]))
            {
                if (index >= problems.Length) break;   // the count has not got further
                continue;
            }
            if (search is not null && !Matches(entry, search)) continue;
            if (matched >= offset && page.Count < limit) page.Add((index, entry));
            matched++;
            if (!needCount && page.Count == limit) break;   // without a filter the summary has the total
        }
        var facts = DataValidator.Check(page.Select(p => p.Entry), Options).ToList();
        return new SamplePage(page.Select((p, i) => new BrowsedSample(p.Index, facts[i])).ToList(), needCount ? matched : null, complete);
    }

    /// <summary>Record <paramref name="index"/> in full; null past the end.</summary>
    public SampleDetail? Detail(long index, CancellationToken ct = default)
    {
        var entry = EntryAt(index, ct);
        if (entry is null) return null;
        var facts = DataValidator.Check(entry.Value, Options);
        var grids = facts.Images.Select(i => i.Tiles is null ? (TileGrid?)null
            : DynamicPreprocess.Plan(i.Width, i.Height, Options.MinTiles, i.MaxTiles, Options.UseThumbnail)).ToList();
        return new SampleDetail(new BrowsedSample(index, facts), grids, Tokens(facts));
    }

    /// <summary>The file of image <paramref name="image"/> of record <paramref name="index"/>, resolved inside the image root now.</summary>
    /// <exception cref="VlmTuneException">The record has no such image, or its path leaves the image root.</exception>
    public string ImagePath(long index, int image, CancellationToken ct = default)
    {
        var entry = EntryAt(index, ct) ?? throw new KeyNotFoundException($"there is no record {index}");
        if (entry.Problem is { Kind: DataProblemKind.PathEscapesRoot } escape) throw new VlmTuneException($"record {index}: {escape.Message}; it is not served");
        var sample = entry.Sample ?? throw new KeyNotFoundException($"record {index} is not a sample: {entry.Problem!.Message}");
        if (image < 0 || image >= sample.Images.Count) throw new KeyNotFoundException($"record {index} has {sample.Images.Count} image(s), no image {image}");
        return sample.Images[image];
    }

    private DataEntry? EntryAt(long index, CancellationToken ct)
    {
        if (index < 0) return null;
        long i = 0;
        foreach (var entry in _read())
        {
            ct.ThrowIfCancellationRequested();
            if (i++ == index) return entry;
        }
        return null;
    }

    private static bool Matches(DataEntry entry, string search) => entry.Sample is { } s
        ? s.Id.Contains(search, StringComparison.OrdinalIgnoreCase) || s.Conversations.Any(t => t.Value.Contains(search, StringComparison.OrdinalIgnoreCase))
        : entry.Problem!.Message.Contains(search, StringComparison.OrdinalIgnoreCase);

    /// <summary>The training tokenization of a sound sample (over-long ones too: they show where the cut falls).</summary>
    private SampleTokens? Tokens(SampleFacts facts)
    {
        if (Options.Length is not TrainingLength length || facts.Entry.Sample is not { } sample) return null;
        if (facts.Problems.Any(p => p.Kind != DataProblemKind.TooLong)) return null;
        var tiles = facts.Images.Select(i => i.Tiles ?? 0).ToArray();
        var imageTokens = length.NumImageToken * tiles.Sum();
        TokenizedSample tokens;
        try { tokens = length.Tokenize(sample.Conversations, tiles, Options.MaxLength ?? int.MaxValue, sample.Source.ToString()); }
        catch (VlmTuneException e)
        {
            return new SampleTokens(facts.Length!.Value - imageTokens, imageTokens, facts.Length!.Value, Options.MaxLength, true, 0, false, [], e.Message);
        }
        return new SampleTokens(tokens.FullLength - imageTokens, imageTokens, tokens.FullLength, Options.MaxLength, tokens.Truncated,
            tokens.SupervisedTokenCount, tokens.LabelsMaskedForMismatch, Spans(tokens, length.Tokenizer), null);
    }

    /// <summary>Runs of learned / masked tokens decoded to text; each image's token run is one span.</summary>
    private static List<TokenSpan> Spans(TokenizedSample tokens, TextTokenizer tokenizer)
    {
        var spans = new List<TokenSpan>();
        var imageContext = tokenizer.ImgContextId;
        var start = 0;
        for (var i = 1; i <= tokens.InputIds.Length; i++)
        {
            bool End(int k) => k == tokens.InputIds.Length
                || (tokens.Labels[k] != ConversationTokenizer.IgnoreTokenId) != (tokens.Labels[start] != ConversationTokenizer.IgnoreTokenId)
                || (tokens.InputIds[k] == imageContext) != (tokens.InputIds[start] == imageContext);
            if (!End(i)) continue;
            var ids = tokens.InputIds[start..i];
            var image = ids[0] == imageContext;
            var learned = tokens.Labels[start] != ConversationTokenizer.IgnoreTokenId;
            spans.Add(new TokenSpan(image ? $"<IMG_CONTEXT>×{ids.Length}" : tokenizer.Decode(ids, skipSpecialTokens: false), learned, ids.Length, image));
            start = i;
        }
        return spans;
    }

    private void RunScan()
    {
        try
        {
            var first = true;
            foreach (var facts in DataValidator.Check(_read(), Options))
            {
                _stop.Token.ThrowIfCancellationRequested();
                lock (_lock)
                {
                    _report.Add(facts, Options);
                    _hasProblem.Add(facts.HasProblems);
                }
                if (first && _holdAfterFirstBatch is not null && _report.Records == 1) { first = false; _holdAfterFirstBatch.Wait(_stop.Token); }
            }
        }
        catch (OperationCanceledException) { }
        catch (VlmTuneException e) { lock (_lock) _scanError = e.Message; }
        finally { _complete = true; }
    }

    public void Dispose() => _stop.Cancel();
}
