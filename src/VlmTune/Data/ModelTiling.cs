using VlmTune.Models;
using VlmTune.Vision;

namespace VlmTune.Data;

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
}
