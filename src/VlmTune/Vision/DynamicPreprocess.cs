namespace VlmTune.Vision;

/// <summary>A tiling decision: the resized image is Columns × Rows tiles, plus a thumbnail when <see cref="Thumbnail"/>.</summary>
public readonly record struct TileGrid(int Columns, int Rows, bool Thumbnail)
{
    /// <summary>Tiles the model sees: the grid plus the thumbnail.</summary>
    public int TileCount => Columns * Rows + (Thumbnail ? 1 : 0);
}

/// <summary>
/// InternVL's <c>dynamic_preprocess</c>: pick the tile grid (i columns × j rows, min ≤ i·j ≤ max) whose aspect ratio is
/// closest to the image's, resize the image to (size·i, size·j) with Pillow bicubic, cut it into tiles row-major and,
/// when there is more than one tile, append the whole image resized to size × size as a thumbnail.
/// </summary>
public static class DynamicPreprocess
{
    public const int DefaultImageSize = 448;

    /// <summary>The grid for a width × height image; needs no pixels (data validation counts tokens with it).</summary>
    public static TileGrid Plan(int width, int height, int minNum = 1, int maxNum = 12, bool useThumbnail = true, int imageSize = DefaultImageSize)
    {
        if (width < 1 || height < 1) throw new ArgumentOutOfRangeException(nameof(width), $"Image size must be at least 1x1, got {width}x{height}.");
        if (minNum < 1 || maxNum < minNum) throw new ArgumentOutOfRangeException(nameof(minNum), $"Need 1 <= min_num <= max_num, got min_num={minNum}, max_num={maxNum}.");
        if (imageSize < 1) throw new ArgumentOutOfRangeException(nameof(imageSize), $"Tile size must be positive, got {imageSize}.");
        var (columns, rows) = FindClosestAspectRatio((double)width / height, TargetRatios(minNum, maxNum), width, height, imageSize);
        return new TileGrid(columns, rows, useThumbnail && columns * rows != 1);
    }

    /// <summary>Number of tiles <see cref="Apply"/> yields for a width × height image.</summary>
    public static int CountTiles(int width, int height, int minNum = 1, int maxNum = 12, bool useThumbnail = true, int imageSize = DefaultImageSize) =>
        Plan(width, height, minNum, maxNum, useThumbnail, imageSize).TileCount;

    /// <summary>The tiles of <paramref name="image"/>, row-major, thumbnail last — the official function's output.</summary>
    public static List<RgbImage> Apply(RgbImage image, int minNum = 1, int maxNum = 12, bool useThumbnail = true, int imageSize = DefaultImageSize)
    {
        var grid = Plan(image.Width, image.Height, minNum, maxNum, useThumbnail, imageSize);
        var resized = PilResize.Resize(image, imageSize * grid.Columns, imageSize * grid.Rows);
        var tiles = new List<RgbImage>(grid.TileCount);
        for (int i = 0; i < grid.Columns * grid.Rows; i++)
            tiles.Add(resized.Crop(i % grid.Columns * imageSize, i / grid.Columns * imageSize, imageSize, imageSize));
        if (grid.Thumbnail) tiles.Add(PilResize.Resize(image, imageSize, imageSize));
        return tiles;
    }

    /// <summary>
    /// The official <c>find_closest_aspect_ratio</c>: smallest |aspect − i/j| wins; on an exact tie the later candidate
    /// (more tiles) wins only when the image area exceeds half the area of that candidate's tiles
    /// (<c>area &gt; 0.5 · size² · i · j</c>), so small images are not blown up into many tiles.
    /// </summary>
    public static (int Columns, int Rows) FindClosestAspectRatio(double aspectRatio, IReadOnlyList<(int Columns, int Rows)> targetRatios,
        int width, int height, int imageSize)
    {
        double bestDiff = double.PositiveInfinity;
        var best = (1, 1);
        long area = (long)width * height;
        foreach (var ratio in targetRatios)
        {
            double diff = Math.Abs(aspectRatio - (double)ratio.Columns / ratio.Rows);
            if (diff < bestDiff)
            {
                bestDiff = diff;
                best = ratio;
            }
            else if (diff == bestDiff && area > 0.5 * imageSize * imageSize * ratio.Columns * ratio.Rows)
            {
                best = ratio;
            }
        }
        return best;
    }

    /// <summary>
    /// Candidate grids in the official order: <c>sorted({(i, j) ...}, key=i*j)</c>. Python's sort is stable, so grids
    /// with the same tile count keep the iteration order of the Python set they came from; that order decides exact
    /// ties between them (possible only when min_num &gt; 1), so it is reproduced by <see cref="PythonSetOrder"/>.
    /// </summary>
    public static IReadOnlyList<(int Columns, int Rows)> TargetRatios(int minNum, int maxNum) =>
        RatioCache.GetOrAdd((minNum, maxNum), key => BuildTargetRatios(key.Min, key.Max));

    // Data validation calls CountTiles for every image of a data set; the candidates depend only on (min, max).
    private static readonly System.Collections.Concurrent.ConcurrentDictionary<(int Min, int Max), IReadOnlyList<(int Columns, int Rows)>> RatioCache = new();

    private static IReadOnlyList<(int Columns, int Rows)> BuildTargetRatios(int minNum, int maxNum)
    {
        // The official comprehension loops n = min..max, i, j = 1..n and adds (i, j) when min <= i*j <= max; the set
        // keeps the first insertion, which happens at n = max(min, i, j), in (i, j) order within one n. Listing each
        // grid once in that order gives the same set without the cubic loop.
        var generated = new List<(int N, int I, int J)>();
        for (int i = 1; i <= maxNum; i++)
            for (int j = Math.Max(1, (minNum + i - 1) / i); i * j <= maxNum; j++)
                generated.Add((Math.Max(minNum, Math.Max(i, j)), i, j));
        generated.Sort();
        var ordered = PythonSetOrder.Iterate(generated.Select(g => (g.I, g.J)));
        // OrderBy is stable, like Python's sorted.
        return ordered.OrderBy(r => r.Item1 * r.Item2).ToList().AsReadOnly();
    }
}
