using VlmTune.Models;
using VlmTune.Vision;

namespace VlmTune.Data;

/// <summary>How the images of one sample (or request) share the most-tiles budget.</summary>
public enum TileSharing
{
    /// <summary>Each image may take the whole budget: the official <c>chat()</c> demos, LMDeploy and vLLM serve this way.</summary>
    PerImage,
    /// <summary>The images split it, at least one tile each: the official fine-tuning dataset (<c>max_dynamic_patch // num_image</c>).</summary>
    SplitBetweenImages,
}

/// <summary>
/// The image tiling a model folder was released with (config.json: <c>force_image_size</c>, <c>min/max_dynamic_patch</c>,
/// <c>use_thumbnail</c>, <c>dynamic_image_size</c>): the one default that chat, serving, validation and training start
/// from, so they never disagree about how many tiles an image makes.
/// </summary>
public static class ModelTiling
{
    /// <param name="maxTiles">An explicit most-tiles-per-image (--max-tiles, max_dynamic_patch); null: the model's.</param>
    public static ImageProcessorOptions ImageOptions(this InternVLConfig config, int? maxTiles = null)
    {
        // dynamic_image_size false: the official code resizes each image to one tile, with no thumbnail.
        bool dynamic = config.DynamicImageSize;
        return new ImageProcessorOptions
        {
            ImageSize = config.ForceImageSize,
            MinTiles = dynamic ? config.MinDynamicPatch : 1,
            MaxTiles = dynamic ? maxTiles ?? config.MaxDynamicPatch : 1,
            UseThumbnail = dynamic && config.UseThumbnail,
        };
    }

    /// <summary>
    /// The tile budget of each image of a sample or request with <paramref name="imageCount"/> images: the one rule
    /// validation, training's encoder, chat and serving apply (<paramref name="maxTiles"/>: a sample's own
    /// max_dynamic_patch, from an InternVL meta file; null: the options').
    /// </summary>
    public static ImageProcessorOptions ForImages(this ImageProcessorOptions options, int imageCount, TileSharing sharing, int? maxTiles = null) =>
        options with { MaxTiles = TilesPerImage(maxTiles ?? options.MaxTiles, imageCount, sharing) };

    /// <summary>The most tiles each of <paramref name="imageCount"/> images may take out of <paramref name="budget"/>.</summary>
    public static int TilesPerImage(int budget, int imageCount, TileSharing sharing) =>
        sharing == TileSharing.PerImage ? budget : Math.Max(1, budget / Math.Max(1, imageCount));
}
