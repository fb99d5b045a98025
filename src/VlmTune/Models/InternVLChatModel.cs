using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace VlmTune.Models;

/// <summary>
/// InternVL: InternViT → pixel shuffle v2 → mlp1 projector → image embeddings spliced into the LLM at the
/// &lt;IMG_CONTEXT&gt; positions. Field names equal the official checkpoint keys, so loading is strict with no name map.
/// </summary>
public sealed class InternVLChatModel : nn.Module
{
    public InternVisionModel vision_model;
    public Sequential mlp1;
    public CausalLanguageModel language_model;

    public InternVLConfig Config { get; }
    public ModelOptions Options { get; }

    public InternVLChatModel(InternVLConfig c, ModelOptions o) : base(nameof(InternVLChatModel))
    {
        Config = c; Options = o;
        vision_model = new InternVisionModel(c.Vision, o);
        mlp1 = nn.Sequential(
            ("0", new LayerNorm(c.ProjectorInputSize, 1e-5, o)),
            ("1", new Linear(c.ProjectorInputSize, c.Llm.HiddenSize, true, o)),
            ("2", nn.GELU()),
            ("3", new Linear(c.Llm.HiddenSize, c.Llm.HiddenSize, true, o)));
        language_model = CausalLanguageModel.Create(c.Llm, o);
        RegisterComponents();
    }

    /// <summary>Image tiles (N, 3, 448, 448) → LLM-space image embeddings (N, 256, D): <see cref="VisionFeatures"/> then <see cref="Project"/>.</summary>
    /// <param name="visionGrad">Build the autograd graph through the ViT (false: it runs under no_grad, as a frozen ViT should).</param>
    /// <param name="projectorGrad">Build the graph through mlp1.</param>
    public Tensor ExtractFeatures(Tensor pixels, bool visionGrad = true, bool projectorGrad = true)
    {
        using var scope = NewDisposeScope();
        return Project(VisionFeatures(pixels, visionGrad), projectorGrad).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The vision tower's part: tiles (N, 3, 448, 448) → pixel-shuffled ViT features (N, 256, 4C), the projector's input.
    /// What a frozen ViT gives for an image never changes, so training can cache this (Data/VisionFeatureCache).
    /// </summary>
    /// <param name="grad">Build the autograd graph through the ViT (false: it runs under no_grad).</param>
    public Tensor VisionFeatures(Tensor pixels, bool grad = true)
    {
        using var scope = NewDisposeScope();
        Tensor vit;
        using (grad ? null : no_grad())
            vit = vision_model.Forward(pixels.to(Options.Device), Config.SelectLayer);
        vit = vit[.., 1.., ..];                                                       // drop CLS: (N, G·G, C)
        long n = vit.shape[0], g = (long)Math.Round(Math.Sqrt(vit.shape[1])), c = vit.shape[2];
        var shuffled = PixelShuffle(vit.reshape(n, g, g, c), Config.DownsampleRatio);
        return shuffled.reshape(n, -1, shuffled.shape[^1]).MoveToOuterDisposeScope();  // (N, 256, 4C)
    }

    /// <summary>The mlp1 projector: pixel-shuffled ViT features (N, 256, 4C) → LLM-space embeddings (N, 256, D).</summary>
    /// <param name="grad">Build the autograd graph through mlp1.</param>
    public Tensor Project(Tensor visionFeatures, bool grad = true)
    {
        using (grad ? null : no_grad())
            return mlp1.forward(visionFeatures.to(Options.Device));
    }

    /// <summary>Pixel shuffle v2: (N, W, H, C) → (N, W·r, H·r, C/r²), merging r⁻¹×r⁻¹ neighbours into channels.</summary>
    public static Tensor PixelShuffle(Tensor x, double r)
    {
        long n = x.shape[0], w = x.shape[1], h = x.shape[2], c = x.shape[3];
        long hr = (long)(h * r), wr = (long)(w * r);
        x = x.view(n, w, hr, (long)(c / r));                                          // (N, W, H·r, C/r)
        x = x.permute(0, 2, 1, 3).contiguous();                                       // (N, H·r, W, C/r)
        x = x.view(n, hr, wr, (long)(c / (r * r)));                                   // (N, H·r, W·r, C/r²)
        return x.permute(0, 2, 1, 3).contiguous();                                    // v2 restores the (W, H) order
    }

    /// <summary>Token embeddings (B, T, D) with the rows at <paramref name="imageContextId"/> replaced, in order, by image features.</summary>
    /// <param name="imageSlots">The caller's count of <paramref name="imageContextId"/> tokens in <paramref name="ids"/>
    /// when it has it on the host (the trainer's batches), sparing a device synchronisation mid-step; null: counted here.</param>
    public Tensor EmbedWithImages(Tensor ids, Tensor? imageFeatures, int imageContextId, long? imageSlots = null)
    {
        using var scope = NewDisposeScope();
        ids = ids.to(Options.Device);
        var embeds = language_model.Embed(ids);
        var slots = ids.eq(imageContextId);
        long slotCount = imageSlots ?? slots.sum().item<long>();
        long featureRows = imageFeatures is null ? 0 : imageFeatures.shape[0] * imageFeatures.shape[1];
        if (slotCount != featureRows)
            throw new VlmTuneException($"The prompt has {slotCount} <IMG_CONTEXT> tokens but the images give {featureRows} embeddings ({Config.NumImageToken} per tile); each <image> must expand to {Config.NumImageToken} × its tile count.");
        if (slotCount == 0) return embeds.MoveToOuterDisposeScope();
        var features = imageFeatures!.reshape(-1, embeds.shape[^1]).to_type(embeds.dtype);
        return embeds.masked_scatter(slots.unsqueeze(-1), features).MoveToOuterDisposeScope();
    }
}
