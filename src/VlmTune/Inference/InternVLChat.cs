using System.Text.Json;
using TorchSharp;
using VlmTune.Checkpoints;
using VlmTune.Models;
using VlmTune.Data;
using VlmTune.Text;
using VlmTune.Vision;
using static TorchSharp.torch;

namespace VlmTune.Inference;

/// <summary>How to load a model for chat.</summary>
public sealed record ChatLoadOptions
{
    /// <summary>"cpu", "cuda" or "cuda:N" (<see cref="TensorPlacement"/>).</summary>
    public string Device { get; init; } = "cpu";
    /// <summary>Compute dtype; null picks float32 on CPU and bfloat16 on CUDA.</summary>
    public ScalarType? DType { get; init; }
    public AttentionKind Attention { get; init; } = AttentionKind.Sdpa;
    /// <summary>Most tiles per image (thumbnail excluded), as max_num of the official dynamic_preprocess; null: the model's max_dynamic_patch.</summary>
    public int? MaxTiles { get; init; }
    public ImageLimits ImageLimits { get; init; } = ImageLimits.Default;
    /// <summary>
    /// A fine-tuned adapter to apply after loading: a training checkpoint (iter_&lt;n&gt;/ or its work dir) or a PEFT
    /// LoRA adapter folder (see <see cref="Checkpoints.AdapterLoader"/>); null: none.
    /// </summary>
    public string? AdapterDir { get; init; }
    /// <summary>
    /// Fold the adapter's LoRA branches into the loaded weights (fp32, rounded once to the compute dtype) so decoding
    /// costs what the base model costs (the server); false keeps them as separate branches (<c>vlmtune chat</c>).
    /// </summary>
    public bool MergeAdapter { get; init; } = true;
    /// <summary>Run the adapter, unmerged, on NF4-quantised LLM decoder weights, as QLoRA trained it (default: the original weights).</summary>
    public bool AdapterNf4Base { get; init; }
    /// <summary>The entry point's environment switches: fused decoding in <see cref="InternVLChat.Engine"/>, the NF4 kernel.</summary>
    public RuntimeSwitches Switches { get; init; } = RuntimeSwitches.Defaults;
}

/// <summary>One user turn: the question, its images (in &lt;image&gt; order) and what came before.</summary>
public sealed record ChatRequest
{
    public required string Question { get; init; }
    public IReadOnlyList<string> ImagePaths { get; init; } = [];
    public IReadOnlyList<ChatTurn> History { get; init; } = [];
    /// <summary>Overrides the template's system message.</summary>
    public string? SystemMessage { get; init; }
    public SamplingOptions Sampling { get; init; } = new();
}

public sealed record ChatReply(string Text, IReadOnlyList<int> TokenIds, int PromptTokens, IReadOnlyList<int> Tiles, FinishReason FinishReason)
{
    /// <summary>The prompt as token ids (template, image tokens and all): what parity checks compare with other tools.</summary>
    public IReadOnlyList<int> PromptIds { get; init; } = [];
}

/// <summary>A prompt ready for the model: token ids and the pixel tiles of its images (all images concatenated).</summary>
public sealed class PreparedPrompt(int[] inputIds, Tensor? pixels, IReadOnlyList<int> tiles) : IDisposable
{
    public int[] InputIds { get; } = inputIds;
    public Tensor? Pixels { get; } = pixels;
    public IReadOnlyList<int> Tiles { get; } = tiles;
    public void Dispose() => Pixels?.Dispose();
}

/// <summary>
/// The chat API of an InternVL2 model folder: the official prompt construction (template, system message,
/// &lt;image&gt; expansion), PIL-exact image tiling, and generation with a KV cache — what <c>model.chat()</c> does.
/// </summary>
public sealed class InternVLChat : IDisposable
{
    public InternVLChatModel Model { get; }
    public TextTokenizer Tokenizer { get; }
    public ConversationTemplate Template { get; }
    public ImageProcessor Images { get; }
    /// <summary>The template's stop tokens (&lt;|im_end|&gt;) and the eos ids of generation_config.json.</summary>
    public IReadOnlySet<int> StopIds { get; }

    /// <summary>The switches it was loaded with (<see cref="ChatLoadOptions.Switches"/>), for the engines that run it.</summary>
    public RuntimeSwitches Switches { get; }

    private InternVLChat(InternVLChatModel model, TextTokenizer tokenizer, ConversationTemplate template, ImageProcessor images, IReadOnlySet<int> stopIds,
        RuntimeSwitches switches)
    {
        Model = model; Tokenizer = tokenizer; Template = template; Images = images; StopIds = stopIds; Switches = switches;
    }

    public static InternVLChat Load(string modelDir, ChatLoadOptions? options = null)
    {
        options ??= new ChatLoadOptions();
        var device = TensorPlacement.ParseDevice(options.Device);
        var dtype = options.DType ?? ModelOptions.DefaultDType(device);
        var tokenizer = TextTokenizer.Load(modelDir);
        var model = InternVLModelLoader.Load(modelDir, new ModelOptions { Device = device, DType = dtype, Attention = options.Attention });
        if (options.AdapterDir is { } adapter)
        {
            try
            {
                Checkpoints.AdapterLoader.Apply(model, adapter, new Checkpoints.AdapterApplyOptions
                {
                    Nf4Base = options.AdapterNf4Base, Nf4Kernel = options.Switches.Nf4Kernel, MergeIntoWeights = options.MergeAdapter && !options.AdapterNf4Base,
                });
            }
            catch
            {
                model.Dispose();
                throw;
            }
        }
        var template = ModelLength.ModelTemplate(model.Config);
        var images = new ImageProcessor(model.Config.ImageOptions(options.MaxTiles) with { Limits = options.ImageLimits });
        return new InternVLChat(model, tokenizer, template, images, StopIdsFor(modelDir, template, tokenizer), options.Switches);
    }

    /// <summary>The ids that end an answer: the template's stop tokens (model.chat(): eos = sep.strip()) and generation_config.json's eos_token_id.</summary>
    public static IReadOnlySet<int> StopIdsFor(string modelDir, ConversationTemplate template, TextTokenizer tokenizer)
    {
        var stop = template.StopTokens.Select(tokenizer.TokenToId).ToHashSet();
        stop.UnionWith(GenerationConfigEosIds(modelDir));
        return stop;
    }

    private static IEnumerable<int> GenerationConfigEosIds(string modelDir)
    {
        var path = Path.Combine(modelDir, "generation_config.json");
        if (!File.Exists(path)) yield break;
        JsonDocument doc;
        try { doc = JsonDocument.Parse(File.ReadAllText(path)); }
        catch (JsonException e) { throw new VlmTuneException($"{path}: invalid JSON: {e.Message}"); }
        using (doc)
        {
            if (!doc.RootElement.TryGetProperty("eos_token_id", out var eos)) yield break;
            if (eos.ValueKind == JsonValueKind.Number) yield return eos.GetInt32();
            else if (eos.ValueKind == JsonValueKind.Array)
                foreach (var e in eos.EnumerateArray()) if (e.ValueKind == JsonValueKind.Number) yield return e.GetInt32();
        }
    }

    /// <summary>Decodes and tiles the images and builds the prompt ids exactly as the official chat does.</summary>
    public PreparedPrompt Prepare(ChatRequest request)
    {
        var processed = new List<ProcessedImage>();
        try
        {
            foreach (var path in request.ImagePaths) processed.Add(Images.Process(path));
            var tiles = processed.Select(p => p.TileCount).ToList();
            var prompt = ChatPrompt.Build(Tokenizer, Template, request.Question, tiles, Model.Config.NumImageToken, request.History, request.SystemMessage);
            Tensor? pixels = processed.Count == 0 ? null : cat(processed.Select(p => p.PixelValues).ToList(), 0).DetachFromDisposeScope();
            return new PreparedPrompt(prompt.InputIds, pixels, tiles);
        }
        finally { foreach (var p in processed) p.Dispose(); }
    }

    private readonly Lock _engineLock = new();
    private InferenceEngine? _engine;

    /// <summary>
    /// The continuous-batching engine <see cref="Chat"/> runs on, started on first use; several threads may chat at
    /// once and batch together. (The server builds its own engine with its limits.)
    /// </summary>
    public InferenceEngine Engine
    {
        get { lock (_engineLock) return _engine ??= new InferenceEngine(Model, Tokenizer.ImgContextId, new EngineOptions().With(Switches)); }
    }

    /// <summary>Answers one turn; <paramref name="onText"/> receives the text as it is generated.</summary>
    public ChatReply Chat(ChatRequest request, Action<string>? onText = null, CancellationToken cancellation = default)
    {
        using var prompt = Prepare(request);
        var stream = Engine.Submit(new GenerationRequest
        {
            PromptIds = prompt.InputIds, Pixels = prompt.Pixels, ImageTiles = prompt.Tiles, Sampling = request.Sampling, StopIds = StopIds,
        }, cancellation);
        var decoder = onText is null ? null : Tokenizer.CreateStreamDecoder();
        foreach (var id in stream.ReadTokensAsync().ToBlockingEnumerable())
            if (decoder?.Push(id) is { Length: > 0 } delta) onText!(delta);
        var result = stream.Completion.GetAwaiter().GetResult();
        if (decoder?.Flush() is { Length: > 0 } rest) onText!(rest);
        return new ChatReply(Tokenizer.Decode(result.TokenIds), result.TokenIds, result.PromptTokens, prompt.Tiles, result.FinishReason)
        {
            PromptIds = [.. prompt.InputIds],
        };
    }

    public void Dispose()
    {
        lock (_engineLock) _engine?.Dispose();
        Model.Dispose();
    }
}
