using TorchSharp;
using static TorchSharp.torch;

namespace VlmTune.Vision;

/// <summary>Options of the InternVL2 image pipeline (defaults: the released models' settings).</summary>
public sealed record ImageProcessorOptions
{
    public int ImageSize { get; init; } = DynamicPreprocess.DefaultImageSize;
    public int MinTiles { get; init; } = 1;
    public int MaxTiles { get; init; } = 12;
    public bool UseThumbnail { get; init; } = true;
    public ImageLimits Limits { get; init; } = ImageLimits.Default;
}

/// <summary>An image ready for the vision tower: PixelValues is float32 [TileCount, 3, size, size] (thumbnail last).</summary>
public sealed class ProcessedImage(Tensor pixelValues, TileGrid grid, int originalWidth, int originalHeight) : IDisposable
{
    public Tensor PixelValues { get; } = pixelValues;
    public TileGrid Grid { get; } = grid;
    public int TileCount => Grid.TileCount;
    public int OriginalWidth { get; } = originalWidth;
    public int OriginalHeight { get; } = originalHeight;

    public void Dispose() => PixelValues.Dispose();
}

/// <summary>
/// Decode → dynamic tiling → normalise, i.e. the official <c>load_image</c> (<c>Image.open(...).convert('RGB')</c>,
/// <c>dynamic_preprocess</c>, <c>build_transform</c>) in one pass: tiles are normalised straight out of the resized
/// image into one float buffer, and the tensor is created once.
/// </summary>
public sealed class ImageProcessor
{
    public ImageProcessorOptions Options { get; }

    public ImageProcessor(ImageProcessorOptions? options = null)
    {
        Options = options ?? new ImageProcessorOptions();
        var problems = new List<string>();
        if (Options.ImageSize < 1) problems.Add($"ImageSize must be positive, got {Options.ImageSize}");
        if (Options.MinTiles < 1) problems.Add($"MinTiles must be at least 1, got {Options.MinTiles}");
        if (Options.MaxTiles < Options.MinTiles) problems.Add($"MaxTiles ({Options.MaxTiles}) must be at least MinTiles ({Options.MinTiles})");
        if (Options.Limits is null) problems.Add("Limits must be set");
        if (problems.Count > 0) throw new VlmTuneException("Invalid image processing options: " + string.Join("; ", problems) + ".");
    }

    public ProcessedImage Process(string path) => Process(ImageDecoder.Decode(path, Options.Limits));

    public ProcessedImage Process(byte[] data, string name) => Process(ImageDecoder.Decode(data, name, Options.Limits));

    public ProcessedImage Process(RgbImage image)
    {
        int size = Options.ImageSize;
        var grid = DynamicPreprocess.Plan(image.Width, image.Height, Options.MinTiles, Options.MaxTiles, Options.UseThumbnail, size);
        int tileFloats = 3 * size * size;
        var data = new float[(long)grid.TileCount * tileFloats];

        var resized = PilResize.Resize(image, size * grid.Columns, size * grid.Rows);
        int gridTiles = grid.Columns * grid.Rows;
        Parallel.For(0, gridTiles, i =>
            ImageTransform.NormalizeInto(resized, i % grid.Columns * size, i / grid.Columns * size, size, data.AsSpan(i * tileFloats, tileFloats)));
        if (grid.Thumbnail)
            ImageTransform.NormalizeInto(PilResize.Resize(image, size, size), 0, 0, size, data.AsSpan(gridTiles * tileFloats, tileFloats));

        var pixels = torch.tensor(data, [grid.TileCount, 3, size, size]); // [tiles, 3, H, W]
        return new ProcessedImage(pixels, grid, image.Width, image.Height);
    }
}
