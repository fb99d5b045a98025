using System.Collections.Concurrent;
using SkiaSharp;

namespace VlmTune.Data;

/// <summary>Counts the tokens of prompt text (the chat template already applied).</summary>
public interface ITextTokenCounter
{
    int Count(string text);
}

/// <summary>How many 448×448 tiles an image of this size becomes (InternVL's dynamic preprocess, thumbnail included).</summary>
public delegate int TileCounter(int width, int height, int minTiles, int maxTiles, bool useThumbnail);

public sealed record ValidationOptions
{
    /// <summary>Longest allowed sample in tokens (text tokens plus image tokens); null skips the check.</summary>
    public int? MaxLength { get; init; }
    /// <summary>Token counter for the text; null skips length measurement entirely.</summary>
    public ITextTokenCounter? Tokens { get; init; }
    public TileCounter Tiles { get; init; } = DynamicTiles.Count;
    public int MinTiles { get; init; } = 1;
    /// <summary>Tiles of a single image (InternVL's max_dynamic_patch; a meta dataset's own value wins).</summary>
    public int MaxTiles { get; init; } = 12;
    public bool UseThumbnail { get; init; } = true;
    /// <summary>Image tokens per tile: (448 / 14)² × 0.5² = 256 for InternVL2.</summary>
    public int TokensPerTile { get; init; } = 256;
    /// <summary>System prompt put in front of samples that have none (the template's default).</summary>
    public string DefaultSystem { get; init; } = ChatPromptText.InternVL2System;
    /// <summary>Problems kept with full detail in the report; all are counted.</summary>
    public int MaxListedProblems { get; init; } = 200;
}

public sealed class ValidationReport
{
    public long Records { get; internal set; }
    public long Samples { get; internal set; }
    public long Images { get; internal set; }
    public Dictionary<DataProblemKind, long> ErrorsByKind { get; } = new();
    public List<DataProblem> Problems { get; } = new();
    /// <summary>Token length of each valid sample (empty when no tokenizer was given).</summary>
    public List<int> Lengths { get; } = new();
    public long ErrorCount => ErrorsByKind.Values.Sum();
    /// <summary>Samples over the maximum length (they would be truncated).</summary>
    public long TooLong => ErrorsByKind.GetValueOrDefault(DataProblemKind.TooLong);

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
        var imageCache = new ConcurrentDictionary<string, ImageCheck>(StringComparer.Ordinal);
        foreach (var batch in entries.Chunk(BatchSize))
        {
            var paths = batch.Where(e => e.Sample is not null).SelectMany(e => e.Sample!.Images).Distinct().Where(p => !imageCache.ContainsKey(p)).ToArray();
            if (imageCache.Count > 100_000) imageCache.Clear(); // bound memory on huge image sets
            Parallel.ForEach(paths, path => imageCache[path] = CheckImage(path));
            foreach (var entry in batch)
            {
                report.Records++;
                if (entry.Problem is not null) { Add(report, entry.Problem, options); continue; }
                var sample = entry.Sample!;
                report.Samples++;
                report.Images += sample.Images.Count;
                var problems = CheckSample(sample, imageCache, options, out var length);
                foreach (var problem in problems) Add(report, problem, options);
                if (length is { } n) report.Lengths.Add(n);
            }
            progress?.Invoke(report.Records);
        }
        return report;
    }

    private static List<DataProblem> CheckSample(TrainingSample sample, IReadOnlyDictionary<string, ImageCheck> images,
                                                        ValidationOptions options, out int? length)
    {
        var problems = new List<DataProblem>();
        var source = sample.Source;
        var roleError = RoleError(sample.Conversations);
        if (roleError is not null) problems.Add(new DataProblem(DataProblemKind.RolesNotAlternating, source, roleError));
        var placeholders = sample.PlaceholderCount();
        if (placeholders != sample.Images.Count)
            problems.Add(new DataProblem(DataProblemKind.PlaceholderMismatch, source,
                $"{placeholders} <image> placeholder(s) for {sample.Images.Count} image(s)"));

        var imagesOk = true;
        var imageTokens = 0;
        var maxTiles = Math.Max(1, (sample.MaxDynamicPatch ?? options.MaxTiles) / Math.Max(1, sample.Images.Count));
        foreach (var path in sample.Images)
        {
            var check = images[path];
            if (check.Problem is { } kind)
            {
                imagesOk = false;
                problems.Add(new DataProblem(kind, source, $"image {path}: {check.Message}"));
                continue;
            }
            // Each image is <img> + tokens per tile × tiles + </img>.
            imageTokens += options.TokensPerTile * options.Tiles(check.Width, check.Height, options.MinTiles, maxTiles, options.UseThumbnail) + 2;
        }

        length = null;
        if (options.Tokens is not null && imagesOk && roleError is null)
        {
            var text = ChatPromptText.Build(sample.Conversations, options.DefaultSystem).Replace(TrainingSample.ImagePlaceholder, "", StringComparison.Ordinal);
            length = options.Tokens.Count(text) + imageTokens;
            if (options.MaxLength is { } max && length > max)
                problems.Add(new DataProblem(DataProblemKind.TooLong, source, $"{length} tokens, over the maximum length {max} (it would be truncated)"));
        }
        return problems;
    }

    /// <summary>Turns must be: an optional system turn, then human and gpt alternating, ending with gpt.</summary>
    internal static string? RoleError(IReadOnlyList<ChatTurn> turns)
    {
        var start = turns.Count > 0 && turns[0].From == Roles.System ? 1 : 0;
        if (start == turns.Count) return "no human/gpt turns";
        for (var i = start; i < turns.Count; i++)
        {
            var expected = (i - start) % 2 == 0 ? Roles.Human : Roles.Gpt;
            if (turns[i].From != expected)
                return $"turn {i} is from '{turns[i].From}' where '{expected}' was expected (turns must alternate human, gpt after an optional first system turn)";
        }
        if (turns[^1].From != Roles.Gpt) return "the last turn is from 'human' and has no gpt answer to learn from";
        return null;
    }

    private static void Add(ValidationReport report, DataProblem problem, ValidationOptions options)
    {
        report.ErrorsByKind[problem.Kind] = report.ErrorsByKind.GetValueOrDefault(problem.Kind) + 1;
        if (report.Problems.Count < options.MaxListedProblems) report.Problems.Add(problem);
    }

    private readonly record struct ImageCheck(DataProblemKind? Problem, string? Message, int Width, int Height);

    /// <summary>Exists and decodes fully (a truncated file fails, as it does for PIL); the size is as stored.</summary>
    private static ImageCheck CheckImage(string path)
    {
        if (!File.Exists(path)) return new ImageCheck(DataProblemKind.ImageMissing, "not found", 0, 0);
        try
        {
            using var codec = SKCodec.Create(path, out var result);
            if (codec is null) return new ImageCheck(DataProblemKind.ImageUndecodable, $"not a decodable image ({result})", 0, 0);
            var info = new SKImageInfo(codec.Info.Width, codec.Info.Height, SKColorType.Rgba8888, SKAlphaType.Premul);
            using var bitmap = new SKBitmap(info);
            var decoded = codec.GetPixels(info, bitmap.GetPixels());
            return decoded == SKCodecResult.Success
                ? new ImageCheck(null, null, info.Width, info.Height)
                : new ImageCheck(DataProblemKind.ImageUndecodable, $"cannot be decoded ({decoded})", 0, 0);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return new ImageCheck(DataProblemKind.ImageUndecodable, $"cannot be read ({e.Message})", 0, 0);
        }
    }
}

/// <summary>
/// The prompt text of a conversation in InternVL2's internlm2-chat template (chatml, turns joined without newlines
/// as InternVL's MPT separator style does), for measuring lengths.
/// </summary>
public static class ChatPromptText
{
    public const string InternVL2System = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。";

    public static string Build(IReadOnlyList<ChatTurn> turns, string defaultSystem)
    {
        var text = new System.Text.StringBuilder();
        var system = turns.Count > 0 && turns[0].From == Roles.System ? turns[0].Value : defaultSystem;
        text.Append("<|im_start|>system\n").Append(system).Append("<|im_end|>");
        foreach (var turn in turns)
        {
            if (turn.From == Roles.System) continue;
            text.Append(turn.From == Roles.Human ? "<|im_start|>user\n" : "<|im_start|>assistant\n")
                .Append(turn.Value.Trim()).Append("<|im_end|>");
        }
        return text.ToString();
    }
}

/// <summary>
/// InternVL's <c>dynamic_preprocess</c> tile count: the grid (i×j tiles, minTiles ≤ i·j ≤ maxTiles) whose aspect ratio
/// is closest to the image's, a tie going to the larger grid when the image has more than half its pixels; plus one
/// thumbnail tile when the grid has more than one tile.
/// </summary>
public static class DynamicTiles
{
    public static int Count(int width, int height, int minTiles, int maxTiles, bool useThumbnail) =>
        Count(width, height, minTiles, maxTiles, useThumbnail, imageSize: 448);

    public static int Count(int width, int height, int minTiles, int maxTiles, bool useThumbnail, int imageSize)
    {
        var aspect = (double)width / height;
        var ratios = new List<(int I, int J)>();
        for (var i = 1; i <= maxTiles; i++)
            for (var j = 1; j <= maxTiles; j++)
                if (i * j >= minTiles && i * j <= maxTiles) ratios.Add((i, j));
        // Stable sort by tile count; pairs with equal counts never tie on aspect ratio, so their order does not matter.
        ratios = ratios.OrderBy(r => r.I * r.J).ToList();
        var best = (I: 1, J: 1);
        var bestDiff = double.PositiveInfinity;
        var area = (double)width * height;
        foreach (var r in ratios)
        {
            var diff = Math.Abs(aspect - (double)r.I / r.J);
            if (diff < bestDiff) { bestDiff = diff; best = r; }
            else if (diff == bestDiff && area > 0.5 * imageSize * imageSize * r.I * r.J) best = r;
        }
        var blocks = best.I * best.J;
        return useThumbnail && blocks != 1 ? blocks + 1 : blocks;
    }
}
