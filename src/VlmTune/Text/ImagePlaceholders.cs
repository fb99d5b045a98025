using System.Text;

namespace VlmTune.Text;

/// <summary>
/// The <c>&lt;image&gt;</c> placeholders of prompts and training conversations, and their expansion into the tokens
/// the vision features replace: each placeholder, in order, becomes
/// <c>&lt;img&gt;</c> + <c>&lt;IMG_CONTEXT&gt;</c> × (num_image_token × tiles) + <c>&lt;/img&gt;</c>.
/// </summary>
public static class ImagePlaceholders
{
    public const string Placeholder = "<image>";

    /// <summary>
    /// Image tokens per tile: (image_size / patch_size)² × downsample_ratio² — 256 for InternVL2's 448 px tiles,
    /// 14 px patches and pixel shuffle 0.5.
    /// </summary>
    public static int NumImageToken(int imageSize = 448, int patchSize = 14, double downsampleRatio = 0.5)
    {
        if (imageSize <= 0 || patchSize <= 0 || downsampleRatio <= 0)
            throw new VlmTuneException($"Invalid image geometry: image_size {imageSize}, patch_size {patchSize}, downsample_ratio {downsampleRatio}; all must be positive.");
        var side = imageSize / patchSize;   // integer division, as the official code
        return (int)(side * side * downsampleRatio * downsampleRatio);
    }

    /// <summary>Number of <c>&lt;image&gt;</c> placeholders in <paramref name="text"/>.</summary>
    public static int Count(string text)
    {
        var count = 0;
        for (var pos = text.IndexOf(Placeholder, StringComparison.Ordinal); pos >= 0;
             pos = text.IndexOf(Placeholder, pos + Placeholder.Length, StringComparison.Ordinal))
            count++;
        return count;
    }

    /// <summary>
    /// Replaces the placeholders, in order, by the image token runs of <paramref name="imageTiles"/> (tiles per image).
    /// </summary>
    /// <param name="where">What the text is, for the error message (e.g. "the prompt", "sample 12").</param>
    /// <exception cref="VlmTuneException">The number of placeholders differs from the number of images, or a tile count is not positive.</exception>
    public static string Expand(string text, IReadOnlyList<int> imageTiles, int numImageToken, string where)
    {
        ArgumentNullException.ThrowIfNull(text);
        ArgumentNullException.ThrowIfNull(imageTiles);
        Validate(Count(text), imageTiles, numImageToken, where);
        if (imageTiles.Count == 0) return text;

        var result = new StringBuilder(text.Length + imageTiles.Sum(t => t * numImageToken) * SpecialTokens.ImgContext.Length);
        var from = 0;
        foreach (var tiles in imageTiles)
        {
            var at = text.IndexOf(Placeholder, from, StringComparison.Ordinal);
            result.Append(text, from, at - from)
                  .Append(SpecialTokens.ImgStart)
                  .Insert(result.Length, SpecialTokens.ImgContext, numImageToken * tiles)
                  .Append(SpecialTokens.ImgEnd);
            from = at + Placeholder.Length;
        }
        return result.Append(text, from, text.Length - from).ToString();
    }

    /// <summary>Checks that <paramref name="placeholders"/> placeholders fit <paramref name="imageTiles"/>; reports every problem.</summary>
    internal static void Validate(int placeholders, IReadOnlyList<int> imageTiles, int numImageToken, string where)
    {
        var problems = new List<string>();
        if (placeholders != imageTiles.Count)
            problems.Add($"{where} has {placeholders} '{Placeholder}' placeholder(s) but {imageTiles.Count} image(s) were given; " +
                         $"write one '{Placeholder}' per image, in the order of the images");
        for (var i = 0; i < imageTiles.Count; i++)
            if (imageTiles[i] <= 0) problems.Add($"image {i} of {where} has {imageTiles[i]} tiles; it must have at least 1");
        if (numImageToken <= 0) problems.Add($"num_image_token is {numImageToken}; it must be positive");
        if (problems.Count > 0) throw new VlmTuneException(string.Join("; ", problems) + ".");
    }
}
