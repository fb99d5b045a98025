using System.Collections.Concurrent;
using VlmTune.Text;
using VlmTune.Vision;

namespace VlmTune.Data;

/// <summary>Tokens a sample takes in training: its conversation rendered and tokenized, with its images' tiles.</summary>
public interface ISampleLengthCounter
{
    /// <param name="imageTiles">Tiles of each image, in placeholder order.</param>
    int Count(IReadOnlyList<ConversationTurn> conversation, IReadOnlyList<int> imageTiles);
}

/// <summary>How many tiles an image of this size becomes (InternVL's dynamic preprocess, thumbnail included).</summary>
public delegate int TileCounter(int width, int height, int minTiles, int maxTiles, bool useThumbnail);

public sealed record ValidationOptions
{
    /// <summary>Longest allowed sample in tokens; null skips the check.</summary>
    public int? MaxLength { get; init; }
    /// <summary>Measures token lengths; null skips length measurement entirely.</summary>
    public ISampleLengthCounter? Length { get; init; }
    public TileCounter Tiles { get; init; } = (w, h, min, max, thumbnail) => DynamicPreprocess.CountTiles(w, h, min, max, thumbnail);
    public int MinTiles { get; init; } = 1;
    /// <summary>Tiles of a single image (InternVL's max_dynamic_patch; a meta dataset's own value wins).</summary>
    public int MaxTiles { get; init; } = VlmTune.Models.InternVLConfig.DefaultMaxDynamicPatch;
    public bool UseThumbnail { get; init; } = true;
    /// <summary>Problems kept with full detail in the report; all are counted.</summary>
    public int MaxListedProblems { get; init; } = 200;
    /// <summary>Image checks remembered by path (images shared by many samples are decoded once); bounds memory.</summary>
    public int ImageCacheSize { get; init; } = 100_000;
}

/// <summary>One image of a sample as validation saw it: its stored size and tiles, or why it failed.</summary>
/// <param name="Tiles">Tiles it becomes in training; null when it failed or could not be tiled.</param>
/// <param name="MaxTiles">The tile budget it had (shared between a sample's images).</param>
public sealed record ImageFacts(string Path, int Width, int Height, int? Tiles, int MaxTiles, string? Problem);

/// <summary>What validation found in one record: its problems, its images, its training length (when measured).</summary>
/// <param name="Length">Tokens in training (text + image); null when not measured or the sample has other problems.</param>
public sealed record SampleFacts(DataEntry Entry, IReadOnlyList<DataProblem> Problems, IReadOnlyList<ImageFacts> Images, int? Length)
{
    public bool HasProblems => Problems.Count > 0;
}

public sealed class ValidationReport
{
    public long Records { get; internal set; }
    public long Samples { get; internal set; }
    public long Images { get; internal set; }
    public Dictionary<DataProblemKind, long> ErrorsByKind { get; } = new();
    public List<DataProblem> Problems { get; } = new();
    /// <summary>Token length of each sample without other problems (empty when no length counter was given).</summary>
    public List<int> Lengths { get; } = new();
    public long ErrorCount => ErrorsByKind.Values.Sum();
    /// <summary>Samples over the maximum length (they would be truncated).</summary>
    public long TooLong => ErrorsByKind.GetValueOrDefault(DataProblemKind.TooLong);
    /// <summary>Samples by their number of images.</summary>
    public SortedDictionary<int, long> ImagesPerSample { get; } = new();
    /// <summary>Images by the tiles they become (images that could not be tiled are not counted).</summary>
    public SortedDictionary<int, long> TilesPerImage { get; } = new();

    /// <summary>Counts one record's facts into the report (as <see cref="DataValidator.Validate"/> does for each).</summary>
    public void Add(SampleFacts facts, ValidationOptions options)
    {
        Records++;
        if (facts.Entry.Sample is { } sample)
        {
            Samples++;
            Images += sample.Images.Count;
            ImagesPerSample[sample.Images.Count] = ImagesPerSample.GetValueOrDefault(sample.Images.Count) + 1;
            foreach (var image in facts.Images)
                if (image.Tiles is { } t) TilesPerImage[t] = TilesPerImage.GetValueOrDefault(t) + 1;
        }
        foreach (var problem in facts.Problems)
        {
            ErrorsByKind[problem.Kind] = ErrorsByKind.GetValueOrDefault(problem.Kind) + 1;
            if (Problems.Count < options.MaxListedProblems) Problems.Add(problem);
        }
        if (facts.Length is { } n) Lengths.Add(n);
    }

    /// <summary>The p-th percentile (0..100, nearest rank) of <see cref="Lengths"/>.</summary>
    public int Percentile(double p)
    {
        if (Lengths.Count == 0) return 0;
        var sorted = Lengths.Order().ToArray();
        var rank = (int)Math.Ceiling(p / 100 * sorted.Length);
        return sorted[Math.Clamp(rank - 1, 0, sorted.Length - 1)];
    }
}

/// <summary>
/// Checks every record of training data: it parses, roles alternate, &lt;image&gt; placeholders match the images,
/// images exist and decode, and the sample fits the maximum length (text tokens + tokens per tile × tiles, tiles from
/// the real image size). Streams the records; image checks of each batch run in parallel and are cached by path.
/// </summary>
public static class DataValidator
{
    private const int BatchSize = 256;

    public static ValidationReport Validate(IEnumerable<DataEntry> entries, ValidationOptions options, Action<long>? progress = null)
    {
        var report = new ValidationReport();
        foreach (var batch in Check(entries, options).Chunk(BatchSize))
        {
            foreach (var facts in batch) report.Add(facts, options);
            progress?.Invoke(report.Records);
        }
        return report;
    }

    /// <summary>
    /// What validation finds in each record, in order: the one per-record check behind <see cref="Validate"/>, the
    /// dataset browser and <c>data validate --json</c>. Images of each batch are checked in parallel and cached by path.
    /// </summary>
    public static IEnumerable<SampleFacts> Check(IEnumerable<DataEntry> entries, ValidationOptions options)
    {
        var imageCache = new ConcurrentDictionary<string, ImageCheck>(StringComparer.Ordinal);
        foreach (var batch in entries.Chunk(BatchSize))
        {
            if (imageCache.Count > options.ImageCacheSize) imageCache.Clear();
            var paths = batch.Where(e => e.Sample is not null).SelectMany(e => e.Sample!.Images).Distinct().Where(p => !imageCache.ContainsKey(p)).ToArray();
            Parallel.ForEach(paths, new ParallelOptions { MaxDegreeOfParallelism = Environment.ProcessorCount }, path => imageCache[path] = CheckImage(path));
            foreach (var entry in batch)
                yield return entry.Problem is not null
                    ? new SampleFacts(entry, [entry.Problem], [], null)
                    : CheckSample(entry, imageCache, options);
        }
    }

    /// <summary>The facts of one sample on its own (the browser's detail view): the same check, its images decoded now.</summary>
    public static SampleFacts Check(DataEntry entry, ValidationOptions options) => Check([entry], options).Single();

    private static SampleFacts CheckSample(DataEntry entry, IReadOnlyDictionary<string, ImageCheck> images, ValidationOptions options)
    {
        var sample = entry.Sample!;
        var problems = new List<DataProblem>();
        var source = sample.Source;
        var roleError = RoleError(sample.Conversations);
        if (roleError is not null) problems.Add(new DataProblem(DataProblemKind.RolesNotAlternating, source, roleError));
        var placeholders = sample.PlaceholderCount();
        if (placeholders != sample.Images.Count)
            problems.Add(new DataProblem(DataProblemKind.PlaceholderMismatch, source,
                $"{placeholders} <image> placeholder(s) for {sample.Images.Count} image(s)"));

        var tiles = new List<int>(sample.Images.Count);
        var imageFacts = new List<ImageFacts>(sample.Images.Count);
        // As InternVL's fine-tuning (and the trainer's encoder): several images share the tile budget, at least one tile each.
        var maxTiles = ModelTiling.TilesPerImage(sample.MaxDynamicPatch ?? options.MaxTiles, sample.Images.Count, TileSharing.SplitBetweenImages);
        if (sample.Images.Count > 0 && options.MinTiles > maxTiles)
            problems.Add(new DataProblem(DataProblemKind.BadRecord, source,
                $"{sample.Images.Count} images leave {maxTiles} tile(s) each, below min_dynamic_patch {options.MinTiles}"));
        foreach (var path in sample.Images)
        {
            var check = images[path];
            int? imageTiles = null;
            if (check.Problem is { } kind) problems.Add(new DataProblem(kind, source, $"image {path}: {check.Message}"));
            else if (options.MinTiles <= maxTiles)
            {
                imageTiles = options.Tiles(check.Width, check.Height, options.MinTiles, maxTiles, options.UseThumbnail);
                tiles.Add(imageTiles.Value);
            }
            imageFacts.Add(new ImageFacts(path, check.Width, check.Height, imageTiles, maxTiles, check.Message));
        }

        // Only a sample that is otherwise sound can be rendered the way training will.
        int? length = null;
        if (options.Length is not null && problems.Count == 0)
        {
            try { length = options.Length.Count(sample.Conversations, tiles); }
            catch (VlmTuneException e)
            {
                problems.Add(new DataProblem(DataProblemKind.BadRecord, source, e.Message));
                return new SampleFacts(entry, problems, imageFacts, null);
            }
            if (options.MaxLength is { } max && length > max)
                problems.Add(new DataProblem(DataProblemKind.TooLong, source, $"{length} tokens, over the maximum length {max} (it would be truncated)"));
        }
        return new SampleFacts(entry, problems, imageFacts, length);
    }

    /// <summary>Turns must be: an optional system turn, then human and gpt alternating, ending with gpt.</summary>
    internal static string? RoleError(IReadOnlyList<ConversationTurn> turns)
    {
        var start = turns.Count > 0 && turns[0].From == ConversationTurn.System ? 1 : 0;
        if (start == turns.Count) return "no human/gpt turns";
        for (var i = start; i < turns.Count; i++)
        {
            var expected = (i - start) % 2 == 0 ? ConversationTurn.Human : ConversationTurn.Gpt;
            if (turns[i].From != expected)
                return $"turn {i} is from '{turns[i].From}' where '{expected}' was expected (turns must alternate human, gpt after an optional first system turn)";
        }
        if (turns[^1].From != ConversationTurn.Gpt) return "the last turn is from 'human' and has no gpt answer to learn from";
        return null;
    }

    private readonly record struct ImageCheck(DataProblemKind? Problem, string? Message, int Width, int Height);

    /// <summary>Exists and decodes fully with PIL's semantics (a truncated file fails); the size is as stored.</summary>
    private static ImageCheck CheckImage(string path)
    {
        if (!File.Exists(path)) return new ImageCheck(DataProblemKind.ImageMissing, "not found", 0, 0);
        try
        {
            var image = ImageDecoder.Decode(path);
            return new ImageCheck(null, null, image.Width, image.Height);
        }
        catch (ImageException e)
        {
            return new ImageCheck(DataProblemKind.ImageUndecodable, e.Message, 0, 0);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return new ImageCheck(DataProblemKind.ImageUndecodable, $"cannot be read ({e.Message})", 0, 0);
        }
    }
}
