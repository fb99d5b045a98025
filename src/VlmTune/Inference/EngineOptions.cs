using VlmTune.Models;

namespace VlmTune.Inference;

/// <summary>Limits of an <see cref="InferenceEngine"/>: how many sequences decode together and how much KV cache they may hold.</summary>
public sealed record EngineOptions
{
    /// <summary>Sequences decoded together in one step; more wait in the queue.</summary>
    public int MaxBatch { get; init; } = 32;

    /// <summary>
    /// KV-cache budget in token slots (rows × columns of every cache the engine holds; one slot costs
    /// 2 · layers · kv_heads · head_dim · dtype bytes). A request that cannot fit alone is refused; others wait.
    /// </summary>
    public long MaxCacheTokens { get; init; } = 1 << 18;

    /// <summary>Requests that may wait for a batch slot before <see cref="InferenceEngine.Submit"/> refuses with <see cref="EngineBusyException"/>.</summary>
    public int MaxQueue { get; init; } = 256;

    /// <summary>Image tiles encoded in one vision pass (the newly joined requests' tiles are batched up to this).</summary>
    public int MaxVisionTiles { get; init; } = 32;

    /// <summary>
    /// Budget in bytes of the image-feature cache: the projected features of recent images (by a hash of their tiles
    /// and the vision adapter in effect), so a request with an image seen before skips the ViT and projector. Null:
    /// <see cref="DefaultImageCacheBytes"/> for the model's device; 0: off.
    /// </summary>
    public long? ImageCacheBytes { get; init; }

    /// <summary>512 MiB on CUDA (about 500 tiles of InternVL2-2B in bf16), 64 MiB on the CPU.</summary>
    public static long DefaultImageCacheBytes(TorchSharp.torch.Device device) =>
        device.type == TorchSharp.DeviceType.CUDA ? 512L << 20 : 64L << 20;

    /// <summary>
    /// Tokens one prefill pass computes at most (rows × the longest remaining prompt part): waiting prompts are
    /// prefilled together up to it, and a longer prompt in chunks of it, one pass per decode step, so running streams
    /// keep their pace while long prompts arrive.
    /// </summary>
    public int MaxPrefillTokens { get; init; } = 8192;

    /// <summary>
    /// While sequences decode, decode steps a waiting prompt may wait for its prefill pass unless the prompts waiting
    /// fill half of <see cref="MaxPrefillTokens"/> (TGI's max_waiting_tokens): every pass stalls every running stream
    /// for about the host time of a forward pass whatever its size, so a few larger passes cost running streams less
    /// than many small ones, for a little more time to the first token. 0: a pass whenever a prompt waits.
    /// </summary>
    public int MaxWaitingSteps { get; init; } = 16;

    /// <summary>
    /// Budget in bytes of the prefix cache: the keys and values of recent prompts' 64-token blocks (by a hash of the
    /// tokens before each block's end, the images in them and the adapter), so a prompt that starts like an earlier one
    /// (a system prompt, the same image) prefills only the rest. Null: <see cref="DefaultPrefixCacheBytes"/>; 0: off.
    /// </summary>
    public long? PrefixCacheBytes { get; init; }

    /// <summary>2 GiB on CUDA (about 20,000 tokens of InternVL2-2B in bf16), 128 MiB on the CPU.</summary>
    public static long DefaultPrefixCacheBytes(TorchSharp.torch.Device device) =>
        device.type == TorchSharp.DeviceType.CUDA ? 2L << 30 : 128L << 20;

    /// <summary>Longest prompt + max_new_tokens accepted; null: <see cref="DefaultContext"/>.</summary>
    public int? MaxContextTokens { get; init; }

    /// <summary>
    /// Decode steps with the fused CUDA kernels (<see cref="FusedDecoder"/>) where the model allows; false keeps the
    /// TorchSharp ops. The CLI sets it from VLMTUNE_FUSED_DECODE (<see cref="RuntimeSwitches.FusedDecode"/>).
    /// </summary>
    public bool FusedDecode { get; init; } = true;

    /// <summary>The fused kernels' diagnostics for tuning and timing runs (<see cref="RuntimeSwitches.FusedTuning"/>).</summary>
    public FusedDecodeTuning FusedTuning { get; init; } = FusedDecodeTuning.Default;

    /// <summary>These options with the decode switches of <paramref name="switches"/>.</summary>
    public EngineOptions With(RuntimeSwitches switches) => this with { FusedDecode = switches.FusedDecode, FusedTuning = switches.FusedTuning };

    public IEnumerable<string> Validate()
    {
        if (MaxBatch < 1) yield return $"max batch must be ≥ 1 (got {MaxBatch}).";
        if (MaxCacheTokens < 1) yield return $"KV cache budget must be ≥ 1 token (got {MaxCacheTokens}).";
        if (MaxQueue < 0) yield return $"max queue must be ≥ 0 (got {MaxQueue}).";
        if (MaxVisionTiles < 1) yield return $"max vision tiles must be ≥ 1 (got {MaxVisionTiles}).";
        if (MaxWaitingSteps < 0) yield return $"max waiting steps must be ≥ 0 (got {MaxWaitingSteps}).";
        if (MaxPrefillTokens < 1) yield return $"max prefill tokens must be ≥ 1 (got {MaxPrefillTokens}).";
        if (PrefixCacheBytes is < 0) yield return $"prefix cache budget must be ≥ 0 bytes (0: off; got {PrefixCacheBytes}).";
        if (ImageCacheBytes is < 0) yield return $"image cache budget must be ≥ 0 bytes (0: off; got {ImageCacheBytes}).";
        if (MaxContextTokens is < 1) yield return $"max context must be ≥ 1 token (got {MaxContextTokens}).";
    }

    /// <summary>
    /// max_position_embeddings, or with dynamic-NTK RoPE (which extrapolates by design) 4× that and at least 16384:
    /// InternVL2 prompts with several 13-tile images run to thousands of tokens.
    /// </summary>
    public static int DefaultContext(LlmConfig c) =>
        c.RopeScaling is { Type: "dynamic" } ? Math.Max(4 * c.MaxPositionEmbeddings, 16384) : c.MaxPositionEmbeddings;
}

/// <summary>The engine's queue is full: try again later (HTTP 429).</summary>
public sealed class EngineBusyException(string message) : VlmTuneException(message);

/// <summary>A request the engine can never run as given (too long for the context or the cache budget, bad options).</summary>
public class InvalidGenerationRequestException(string message, string? param = null) : VlmTuneException(message)
{
    /// <summary>The request field at fault, named as the OpenAI API names it (e.g. max_tokens), if one is.</summary>
    public string? Param { get; } = param;
}
