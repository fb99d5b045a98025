using TorchSharp;
using System.Collections.Concurrent;
using System.Threading.Channels;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Inference;

/// <summary>
/// Continuous batching over one model. A single background thread owns the model and loops: drop cancelled
/// sequences, admit waiting requests (cached prompt prefixes reused, vision encoding batched across them), run one
/// prefill pass, and run one decode step for every running sequence at once. A prefill pass takes the waiting prompts
/// together, up to <see cref="EngineOptions.MaxPrefillTokens"/> (rows × longest remaining part), right-aligned with
/// left padding hidden by a KeyMask; a longer prompt is prefilled in chunks of that budget, one per loop, so running
/// streams keep decoding meanwhile (chunked prefill). Each sequence keeps its own RoPE positions; the batch's KV cache
/// is one dense tensor per layer whose rows are right-aligned, rebuilt only when sequences join or leave. So a
/// sequence's tokens equal what it would get alone.
///
/// Prompt prefixes seen before skip their prefill: <see cref="PrefixKvCache"/> keeps the keys and values of recent
/// prompts' 64-token blocks by a hash chained over the tokens, the images in them and the adapter (hashed in
/// <see cref="Submit"/>), bounded by <see cref="EngineOptions.PrefixCacheBytes"/>.
///
/// With dynamic-NTK RoPE the base depends on the sequence length once it exceeds max_position_embeddings; such long
/// sequences are prefilled in one pass of their own and decode in their own batch of one, so their rotation is that of a
/// solo run. Phi-3's longrope picks its frequencies by the pass's length: prompts past original_max_position_embeddings
/// are prefilled alone in one pass too.
///
/// With <see cref="ServedAdapters"/>, each request names its adapter (or the base): every pass routes its rows to their
/// adapters' LoRA branches (<see cref="LoraRouting"/>: image tiles in the vision pass, the prompt in prefill, the rows
/// of a decode step), so requests for different adapters share one batch over the unmerged base weights.
///
/// Images seen before skip the vision pass: <see cref="ImageFeatureCache"/> keeps recent images' projected features
/// (by a SHA-256 of each image's tiles, hashed in <see cref="Submit"/> on the caller's thread, and the vision adapter in
/// effect), bounded by <see cref="EngineOptions.ImageCacheBytes"/>.
/// </summary>
public sealed class InferenceEngine : IDisposable
{
    private readonly InternVLChatModel _model;
    private readonly int _imageContextId;
    private readonly EngineOptions _options;
    private readonly int _contextLimit;
    private readonly long _dynamicThreshold;   // a sequence this long or longer decodes alone (long.MaxValue: never)
    private readonly long _onePassFrom;        // a prompt this long or longer is prefilled alone in one pass
    private readonly ConcurrentQueue<Sequence> _pending = new();
    private readonly SemaphoreSlim _wake = new(0);
    private readonly Thread _thread;
    private volatile bool _stopping;
    private int _queued;

    // Owned by the loop thread.
    private readonly List<Sequence> _batch = [];
    private KvCache? _batchCache;
    private readonly List<Sequence> _solo = [];
    private readonly List<Sequence> _prefilling = [];   // admitted, prompt not yet all in their caches; first come first

    private FusedDecoder? _fused;
    private bool _fusedResolved;
    private readonly ServedAdapters? _adapters;
    private int _admissionHeld;

    private int _running;
    private int _peakBatch;
    private long _steps;
    private int _decoding;                    // sequences in the latest decode step; 0 while the engine is idle
    private long _cacheSlots;                 // KV slots (rows × columns) the running sequences' caches hold
    private readonly long[] _stepsByBatch;    // decode steps by the number of sequences they stepped (0..MaxBatch)
    private readonly ImageFeatureCache? _imageCache;   // null: off (ImageCacheBytes 0)
    private readonly PrefixKvCache? _prefixCache;      // null: off (PrefixCacheBytes 0)
    private long _prefillPasses;
    private long _batchRebuilds;

    /// <param name="adapters">Adapters to serve beside the base (the engine owns them from here: disposing it unloads them); null: the base only.</param>
    public InferenceEngine(InternVLChatModel model, int imageContextId, EngineOptions? options = null, ServedAdapters? adapters = null)
    {
        _options = options ?? new EngineOptions();
        var problems = _options.Validate().ToList();
        if (problems.Count > 0) throw new VlmTuneException("Engine options: " + string.Join(" ", problems));
        if (adapters is not null && !ReferenceEquals(adapters.Model, model)) throw new ArgumentException("the adapters were loaded for another model.", nameof(adapters));
        _model = model;
        _adapters = adapters;
        _imageContextId = imageContextId;
        var llm = model.Config.Llm;
        _contextLimit = _options.MaxContextTokens ?? EngineOptions.DefaultContext(llm);
        _dynamicThreshold = llm.RopeScaling is { Type: "dynamic" } ? llm.MaxPositionEmbeddings : long.MaxValue;
        _onePassFrom = llm.RopeScaling switch
        {
            { Type: "dynamic" } => llm.MaxPositionEmbeddings,
            { Type: "longrope" } => llm.OriginalMaxPositionEmbeddings + 1,
            _ => long.MaxValue,
        };
        _stepsByBatch = new long[_options.MaxBatch + 1];
        long imageCacheBytes = _options.ImageCacheBytes ?? EngineOptions.DefaultImageCacheBytes(model.Options.Device);
        if (imageCacheBytes > 0) _imageCache = new ImageFeatureCache(imageCacheBytes);
        long prefixCacheBytes = _options.PrefixCacheBytes ?? EngineOptions.DefaultPrefixCacheBytes(model.Options.Device);
        if (prefixCacheBytes > 0) _prefixCache = new PrefixKvCache(prefixCacheBytes);
        _thread = new Thread(Loop) { IsBackground = true, Name = "vlmtune-engine" };
        _thread.Start();
    }

    public InternVLChatModel Model => _model;

    private long _idleTensorHandles = -1;

    /// <summary>
    /// Tensor handles the loop thread holds undisposed, as of its last idle moment (-1: not idle yet): what the caches
    /// keep, and what a leak would grow (EngineTensorLifetimeTests).
    /// </summary>
    internal long IdleTensorHandles => Volatile.Read(ref _idleTensorHandles);

    /// <summary>Longest prompt + max_new_tokens this engine accepts.</summary>
    public int ContextLimit => _contextLimit;

    public EngineOptions Options => _options;

    /// <summary>The adapters served beside the base model; null when the engine serves the base only.</summary>
    public ServedAdapters? Adapters => _adapters;

    /// <summary>
    /// Why decode steps do not run on the fused CUDA kernels although they are on: adapters are served (the kernels
    /// read base weights only; batched LoRA runs on the TorchSharp path). Null otherwise.
    /// </summary>
    public string? FusedDecodeOffReason => _adapters is not null && _options.FusedDecode
        ? "adapters are served (batched LoRA over the unmerged base runs on the TorchSharp path)"
        : null;

    /// <summary>
    /// Sequences decoding now, waiting requests, the largest batch seen, decode steps run, the sequences of the latest
    /// step (0 when idle), and the KV-cache slots held (of <see cref="EngineOptions.MaxCacheTokens"/>).
    /// </summary>
    public EngineStats Stats => new(Volatile.Read(ref _running), Volatile.Read(ref _queued), Volatile.Read(ref _peakBatch), Interlocked.Read(ref _steps),
        Volatile.Read(ref _decoding), Interlocked.Read(ref _cacheSlots));

    /// <summary>The image-feature cache's hits, misses and bytes held (all 0, with capacity 0, when it is off).</summary>
    public ImageCacheStats ImageCache => _imageCache?.Stats ?? default;

    /// <summary>The prefix cache's hits, misses, reused tokens and blocks held (all 0, with capacity 0, when it is off).</summary>
    public PrefixCacheStats PrefixCache => _prefixCache?.Stats ?? default;

    /// <summary>Prefill passes run so far (a batch of prompts, a chunk of a long one, or a long prompt in one pass).</summary>
    public long PrefillPasses => Interlocked.Read(ref _prefillPasses);

    /// <summary>Test hook: times the batch cache was rebuilt (a join that did not fit in place).</summary>
    internal long BatchRebuilds => Interlocked.Read(ref _batchRebuilds);

    /// <summary>Test hook: the cache itself (null when off), to compare what it holds with a direct vision pass.</summary>
    internal ImageFeatureCache? FeatureCache => _imageCache;

    /// <summary>
    /// Decode steps run so far by the number of sequences each stepped: element n counts the steps of n sequences
    /// (0..<see cref="EngineOptions.MaxBatch"/>). A copy; every element only grows.
    /// </summary>
    public long[] DecodeStepsByBatchSize()
    {
        var counts = new long[_stepsByBatch.Length];
        for (int n = 0; n < counts.Length; n++) counts[n] = Interlocked.Read(ref _stepsByBatch[n]);
        return counts;
    }

    /// <summary>
    /// Queues a request and returns its stream at once. Throws <see cref="InvalidGenerationRequestException"/> for a
    /// request that can never run (bad sampling, too long, image slots not matching the tiles) and
    /// <see cref="EngineBusyException"/> when the queue is full. Cancelling <paramref name="cancellation"/> removes the
    /// request from the batch at the next step and frees its cache.
    /// </summary>
    public GenerationStream Submit(GenerationRequest request, CancellationToken cancellation = default)
    {
        ObjectDisposedException.ThrowIf(_stopping, this);
        Validate(request);
        // Hashed here, on the caller's thread, so the loop never stalls the batch over it.
        var imageKeys = _imageCache is null && _prefixCache is null ? null : ImageKeys(request);
        var slotsBefore = SlotCounts(request.PromptIds);
        var blocks = _prefixCache is null || request.PromptIds.Count >= _onePassFrom ? null
            : PromptBlocks.Of(request.PromptIds, slotsBefore, imageKeys?.Select(k => (k.Key, k.Tiles)).ToList(), _model.Config.NumImageToken, request.Adapter?.KvKey ?? 0);
        if (Interlocked.Increment(ref _queued) + Volatile.Read(ref _running) > _options.MaxQueue + _options.MaxBatch)
        {
            Interlocked.Decrement(ref _queued);
            throw new EngineBusyException($"The server is busy ({_options.MaxBatch} requests running, {_options.MaxQueue} waiting); retry later.");
        }
        // The lease keeps the adapter's weights alive until the request ends, even if it is unloaded meanwhile.
        if (request.Adapter is { } adapter && !adapter.TryAcquire())
        {
            Interlocked.Decrement(ref _queued);
            throw new UnknownModelException($"The model '{adapter.Name}' was unloaded.");
        }
        var seq = new Sequence(request) { ImageKeys = imageKeys, Blocks = blocks, SlotsBefore = slotsBefore };
        if (cancellation.CanBeCanceled)
            seq.Registration = cancellation.Register(static s => { var (engine, q) = ((InferenceEngine, Sequence))s!; q.Cancelled = true; engine.Wake(); }, (this, seq));
        _pending.Enqueue(seq);
        _wake.Release();
        return new GenerationStream(seq.Tokens.Reader, seq.Done.Task, request.PromptIds.Count, () => Volatile.Read(ref seq.CachedTokens));
    }

    /// <summary>Runs a request to its end.</summary>
    public async Task<GenerationResult> GenerateAsync(GenerationRequest request, CancellationToken cancellation = default)
    {
        var stream = Submit(request, cancellation);
        return await stream.Completion.ConfigureAwait(false);
    }

    private void Validate(GenerationRequest r)
    {
        var problems = r.Sampling.Problems().ToList();
        if (problems.Count > 0) throw new InvalidGenerationRequestException(string.Join(" ", problems.Select(p => p.Message)), problems[0].Param);
        if (r.PromptIds.Count == 0) throw new InvalidGenerationRequestException("The prompt is empty.", "messages");
        if (r.Adapter is { } a && !ReferenceEquals(a.Owner, _adapters))
            throw new UnknownModelException($"The model '{a.Name}' is not served by this engine.");
        long total = (long)r.PromptIds.Count + r.Sampling.MaxNewTokens;
        if (total > _contextLimit)
            throw new InvalidGenerationRequestException(
                $"The prompt ({r.PromptIds.Count} tokens) plus max_tokens ({r.Sampling.MaxNewTokens}) is {total} tokens, beyond the context of {_contextLimit}; shorten the prompt or lower max_tokens.", "max_tokens");
        if (total > _options.MaxCacheTokens)
            throw new InvalidGenerationRequestException(
                $"The prompt ({r.PromptIds.Count} tokens) plus max_tokens ({r.Sampling.MaxNewTokens}) needs {total} KV-cache slots, beyond this server's budget of {_options.MaxCacheTokens}; shorten the prompt or lower max_tokens.", "max_tokens");
        int vocab = _model.Config.Llm.VocabSize;
        if (r.PromptIds.Any(id => id < 0 || id >= vocab))
            throw new InvalidGenerationRequestException($"The prompt holds token ids outside the vocabulary [0, {vocab}).", "messages");
        long slots = r.PromptIds.Count(id => id == _imageContextId);
        long tiles = r.Pixels is null ? 0 : r.Pixels.shape[0];
        int perTile = _model.Config.NumImageToken;
        if (slots != tiles * perTile)
            throw new InvalidGenerationRequestException($"The prompt has {slots} image-context tokens but the images have {tiles} tiles ({perTile} tokens each).", "messages");
        if (r.ImageTiles is { } perImage && (perImage.Any(n => n < 1) || perImage.Sum(n => (long)n) != tiles))
            throw new InvalidGenerationRequestException($"The images' tile counts ({string.Join(", ", perImage)}) do not add up to the {tiles} tiles given (each image has at least one).", "messages");
        if (r.Pixels is { } p && (p.dim() != 4 || p.shape[1] != 3 || p.shape[2] != _model.Config.ForceImageSize || p.shape[3] != _model.Config.ForceImageSize))
            throw new InvalidGenerationRequestException($"Image tiles must be (N, 3, {_model.Config.ForceImageSize}, {_model.Config.ForceImageSize}); got ({string.Join(", ", p.shape)}).", "messages");
    }

    /// <summary>
    /// Image-context tokens before each prompt position (element i: among the first i tokens), counted once here on
    /// the caller's thread: prefill scheduling asks for slot ranges many times a pass.
    /// </summary>
    private int[] SlotCounts(IReadOnlyList<int> ids)
    {
        var counts = new int[ids.Count + 1];
        for (int i = 0; i < ids.Count; i++) counts[i + 1] = counts[i] + (ids[i] == _imageContextId ? 1 : 0);
        return counts;
    }

    /// <summary>Each image's cache key and its tiles in the request's pixels: (key, first tile, tiles).</summary>
    private static List<(ImageKey Key, long Offset, long Tiles)>? ImageKeys(GenerationRequest r)
    {
        if (r.Pixels is not { } pixels) return null;
        long vision = r.Adapter?.VisionKey ?? 0;
        var perImage = r.ImageTiles ?? [(int)pixels.shape[0]];
        var keys = new List<(ImageKey, long, long)>(perImage.Count);
        long offset = 0;
        foreach (int n in perImage)
        {
            using var image = pixels.narrow(0, offset, n);
            keys.Add((ImageKey.Of(image, vision), offset, n));
            offset += n;
        }
        return keys;
    }

    // ---------------------------------------------------------------- loop

    private void Loop()
    {
        using var noGrad = no_grad();
        while (true)
        {
            if (_stopping) { FailAll(); return; }
            try
            {
                DropCancelled();
                Admit();
                PrefillStep();
                if (_batch.Count + _solo.Count == 0)
                {
                    Volatile.Write(ref _decoding, 0);
                    if (_prefilling.Count == 0)
                    {
                        Volatile.Write(ref _idleTensorHandles, TorchSharp.DisposeScopeManager.Statistics.ThreadTotalLiveCount);
                        _wake.Wait();
                    }
                    continue;
                }
                DecodeStep();
            }
            catch (Exception e)
            {
                // An engine failure (e.g. out of memory) ends the sequences it touched, never the loop.
                FailRunning(e);
            }
        }
    }

    private void DropCancelled()
    {
        var dropped = _batch.Where(s => s.Cancelled).ToList();
        foreach (var seq in dropped) seq.Finish(FinishReason.Cancelled);
        LeaveBatch(dropped);
        foreach (var seq in _solo.Where(s => s.Cancelled).ToList())
        {
            _solo.Remove(seq);
            seq.Finish(FinishReason.Cancelled);
        }
        foreach (var seq in _prefilling.Where(s => s.Cancelled).ToList())
        {
            _prefilling.Remove(seq);
            seq.Finish(FinishReason.Cancelled);
        }
        PublishRunning();
    }

    /// <summary>Dense KV slots (rows × columns) the running sequences hold, if <paramref name="joining"/> joined too.</summary>
    private long CacheSlots(IEnumerable<Sequence> joining)
    {
        long rows = 0, length = 0, remaining = 0, solo = 0;
        foreach (var s in _batch.Concat(joining))
        {
            rows++;
            length = Math.Max(length, s.Length);
            remaining = Math.Max(remaining, s.Remaining);
        }
        foreach (var s in _solo.Concat(_prefilling)) solo += s.Length + s.Remaining;
        return rows * (length + remaining) + solo;
    }

    /// <summary>
    /// Test hook: while held, waiting requests are not admitted (running ones decode on), so requests submitted in
    /// the meantime join the batch in one admission once it is released.
    /// </summary>
    internal IDisposable HoldAdmission()
    {
        Interlocked.Increment(ref _admissionHeld);
        return new AdmissionHold(this);
    }

    private sealed class AdmissionHold(InferenceEngine engine) : IDisposable
    {
        private int _released;
        public void Dispose()
        {
            if (Interlocked.Exchange(ref _released, 1) == 1) return;
            Interlocked.Decrement(ref engine._admissionHeld);
            engine.Wake();
        }
    }

    private void Admit()
    {
        if (Volatile.Read(ref _admissionHeld) > 0) return;
        var joining = new List<Sequence>();
        while (Admitted + joining.Count < _options.MaxBatch && _pending.TryPeek(out var next))
        {
            if (next.Cancelled)
            {
                _pending.TryDequeue(out _);
                Interlocked.Decrement(ref _queued);
                next.Finish(FinishReason.Cancelled);
                continue;
            }
            // First come, first served: when the head does not fit the cache budget, later requests wait behind it.
            bool alone = Admitted + joining.Count == 0;
            if (!alone && CacheSlots(joining.Append(next)) > _options.MaxCacheTokens) break;
            _pending.TryDequeue(out _);
            // Counted as running before it stops counting as queued, so Submit never sees a free slot that is not.
            Interlocked.Increment(ref _running);
            Interlocked.Decrement(ref _queued);
            next.AdmittedAtStep = Interlocked.Read(ref _steps);
            Notify(next, static o => o.Admitted());
            if (next.IsFinished) { Interlocked.Decrement(ref _running); next.Request.Pixels?.Dispose(); continue; }
            joining.Add(next);
        }
        if (joining.Count == 0) return;

        foreach (var seq in joining)
        {
            try { StartPrefill(seq); }
            catch (Exception e) { seq.Fail(e); }
        }
        joining.RemoveAll(s => s.IsFinished);
        // A prompt whose cached prefix holds all its image slots needs no features; the others' images are encoded
        // with the prefill pass that needs them (so a burst of arrivals never stalls decoding on vision passes).
        foreach (var s in joining.Where(s => s.ImagesPending && s.Prefilled > 0 && SlotsBefore(s, s.Request.PromptIds.Count) == SlotsBefore(s, s.Prefilled)))
            ImagesDone(s);
        _prefilling.AddRange(joining.Where(s => !s.IsFinished));
        PublishRunning();
    }

    /// <summary>Sequences admitted: decoding, or being prefilled.</summary>
    private int Admitted => _batch.Count + _solo.Count + _prefilling.Count;

    /// <summary>
    /// A joining prompt's own one-row cache, with the keys and values of its longest cached prefix loaded (at least its
    /// last token is left to compute: its logits give the first token). Prompts prefilled in one pass get theirs later.
    /// </summary>
    private void StartPrefill(Sequence seq)
    {
        int promptLength = seq.Request.PromptIds.Count;
        if (promptLength >= _onePassFrom) return;
        var lm = _model.language_model;
        seq.Cache = new KvCache(lm.Config, 1, promptLength, _model.Options.DType, _model.Options.Device);
        if (_prefixCache is null || seq.Blocks is null) return;
        using var scope = NewDisposeScope();
        if (_prefixCache.Take(seq.Blocks, (promptLength - 1) / PromptBlocks.Size) is { } prefix)
        {
            seq.Cache.LoadPrefix(prefix, lm.Rotary.Theta(promptLength));
            seq.Prefilled = (int)seq.Cache.Length;
            seq.CachedBlocks = seq.Prefilled / PromptBlocks.Size;
            Volatile.Write(ref seq.CachedTokens, seq.Prefilled);
        }
    }

    /// <summary>Vision encoding of every joining request's tiles, in passes of at most MaxVisionTiles tiles.</summary>
    private void EncodeImages(IReadOnlyList<Sequence> rows)
    {
        var withImages = rows.Where(s => s.ImagesPending).ToList();
        int i = 0;
        while (i < withImages.Count)
        {
            var group = new List<Sequence>();
            long tiles = 0;
            while (i < withImages.Count && (group.Count == 0 || tiles + withImages[i].Request.Pixels!.shape[0] <= _options.MaxVisionTiles))
            {
                tiles += withImages[i].Request.Pixels!.shape[0];
                group.Add(withImages[i++]);
            }
            EncodeGroup(group);
            foreach (var s in group) ImagesDone(s);
        }
    }

    /// <summary>A request's images are dealt with (encoded, or covered by its cached prefix): its tiles go, the observer hears of them.</summary>
    private static void ImagesDone(Sequence s)
    {
        long n = s.Request.Pixels!.shape[0];
        s.Request.Pixels.Dispose();
        s.ImagesPending = false;
        if (!s.IsFinished) Notify(s, o => o.TilesEncoded((int)n));
    }

    /// <summary>
    /// One vision pass over the group's images that the cache does not hold (each distinct image once), then each
    /// request's features (its images' features in order, cached or fresh). The fresh ones enter the cache after every
    /// request has taken its copy, so no entry found for this group is evicted before it is read. A failed pass fails the
    /// requests that needed it; those whose images were all cached go on.
    /// </summary>
    private void EncodeGroup(List<Sequence> group)
    {
        using var scope = NewDisposeScope();
        var cache = _imageCache;
        var toEncode = new List<(Sequence Seq, long Offset, long Tiles, ImageKey? Key)>();
        var fresh = new Dictionary<ImageKey, int>();          // image → its index in toEncode
        var parts = new Dictionary<Sequence, List<(Tensor? Cached, int Fresh)>>();
        long hits = 0;
        foreach (var s in group)
        {
            var list = parts[s] = [];
            if (cache is null || s.ImageKeys is null)
            {
                list.Add((null, toEncode.Count));
                toEncode.Add((s, 0, s.Request.Pixels!.shape[0], null));
                continue;
            }
            foreach (var (key, offset, n) in s.ImageKeys)
            {
                if (cache.Find(key) is { } cached) { list.Add((cached, -1)); hits++; }
                else if (fresh.TryGetValue(key, out int j)) { list.Add((null, j)); hits++; }   // an equal image of this group: encoded once
                else
                {
                    fresh[key] = toEncode.Count;
                    list.Add((null, toEncode.Count));
                    toEncode.Add((s, offset, n, key));
                }
            }
        }

        var pieces = new Tensor[toEncode.Count];
        Exception? passFailure = null;
        if (toEncode.Count > 0)
        {
            try
            {
                var pixels = cat(toEncode.Select(e => e.Seq.Request.Pixels!.narrow(0, e.Offset, e.Tiles).to(_model.Options.DType, _model.Options.Device)).ToArray(), 0);
                // The vision encoder's and projector's rows are tiles: each request's tiles take its adapter's branches.
                using var routing = Route(toEncode.SelectMany(e => Enumerable.Repeat(e.Seq.Branches, (int)e.Tiles)).ToList());
                var features = _model.ExtractFeatures(pixels);                                        // (tiles, 256, D)
                long offset = 0;
                for (int j = 0; j < toEncode.Count; j++)
                {
                    pieces[j] = features.narrow(0, offset, toEncode[j].Tiles);                      // (tiles_j, 256, D)
                    offset += toEncode[j].Tiles;
                }
            }
            catch (Exception e) { passFailure = e; }
        }

        foreach (var s in group)
        {
            try
            {
                var list = parts[s];
                if (passFailure is not null && list.Any(p => p.Cached is null)) throw passFailure;
                var own = list.Select(p => p.Cached ?? pieces[p.Fresh]).ToArray();
                s.Features = (own.Length == 1 ? own[0].clone() : cat(own, 0)).DetachFromDisposeScope();  // (tiles, 256, D)
            }
            catch (Exception e) { s.Fail(e); }
        }
        if (cache is null) return;
        cache.Count(hits, misses: toEncode.Count(e => e.Key is not null));
        if (passFailure is not null) return;
        for (int j = 0; j < toEncode.Count; j++)
            if (toEncode[j].Key is { } key) cache.Add(key, pieces[j].clone());   // not taken (too large): freed with the scope
    }

    // ---------------------------------------------------------------- prefill

    /// <summary>
    /// One prefill pass, for the oldest waiting prompt and as many after it as the token budget holds: a long prompt
    /// alone in one pass (dynamic NTK, longrope), a chunk of a prompt longer than the budget, or a batch of prompts.
    /// Prompts whose prefill ends sample their first token and join the decode batch.
    /// </summary>
    private void PrefillStep()
    {
        if (_prefilling.Count == 0) return;
        var head = _prefilling[0];
        long budget = _options.MaxPrefillTokens;
        // Small passes wait while streams decode, up to MaxWaitingSteps steps or half a budget of waiting prompt.
        if (_batch.Count + _solo.Count > 0 && Interlocked.Read(ref _steps) - head.AdmittedAtStep < _options.MaxWaitingSteps
            && _prefilling.Sum(s => s.PromptLeft) < budget / 2) return;
        Interlocked.Increment(ref _prefillPasses);
        List<Sequence> rows = [head];
        if (head.Cache is not null && head.PromptLeft <= budget)
        {
            // Rows × the longest remaining part within the budget (and one vision pass's tiles); prompts further back
            // that do not fit wait for their turn.
            long width = head.PromptLeft, tiles = PendingTiles(head);
            foreach (var s in _prefilling.Skip(1))
            {
                if (s.Cache is null || s.PromptLeft > budget) continue;
                long wider = Math.Max(width, s.PromptLeft), moreTiles = PendingTiles(s);
                if ((rows.Count + 1) * wider > budget) break;
                if (moreTiles > 0 && tiles + moreTiles > _options.MaxVisionTiles) continue;
                if (!rows.Append(s).All(r => CanRecompute(r, wider))) continue;
                rows.Add(s);
                width = wider;
                tiles += moreTiles;
            }
        }
        EncodeImages(rows);
        foreach (var failed in rows.Where(r => r.IsFinished)) _prefilling.Remove(failed);
        rows.RemoveAll(r => r.IsFinished);
        if (rows.Count == 0) { PublishRunning(); return; }
        if (head.Cache is null && ReferenceEquals(rows[0], head))
        {
            _prefilling.RemoveAt(0);
            PrefillOnePass(head);
        }
        else if (rows.Count == 1 && rows[0].PromptLeft > budget) PrefillChunk(rows[0], budget);
        else PrefillBatch(rows);
        PublishRunning();
    }

    /// <summary>Tiles a sequence's images still need encoded (0 once encoded, or when its cached prefix holds them).</summary>
    private static long PendingTiles(Sequence s) => s.ImagesPending ? s.Request.Pixels!.shape[0] : 0;

    /// <summary>
    /// Whether a pass of <paramref name="width"/> columns can take <paramref name="s"/>: a row with less left than the
    /// width takes the tail of its cached part as input again, which needs its image features if that tail holds
    /// image slots (a row whose cached prefix covered its images has none).
    /// </summary>
    private bool CanRecompute(Sequence s, long width)
    {
        if (width <= s.PromptLeft || s.Prefilled == 0) return true;
        int from = (int)Math.Max(0, s.Request.PromptIds.Count - width);
        return s.ImagesPending || s.Features is not null || SlotsBefore(s, s.Prefilled) == SlotsBefore(s, from);
    }

    /// <summary>The whole prompt in one pass into a one-row cache of its own (exactly what a solo run does), then the first token.</summary>
    private void PrefillOnePass(Sequence seq)
    {
        try
        {
            var lm = _model.language_model;
            var device = _model.Options.Device;
            int promptLength = seq.Request.PromptIds.Count;
            // A sequence that will decode alone keeps this cache for good, so it gets its full size now.
            long capacity = promptLength >= _dynamicThreshold ? promptLength + seq.Request.Sampling.MaxNewTokens : promptLength;
            seq.Cache = new KvCache(lm.Config, 1, capacity, _model.Options.DType, device);
            using var scope = NewDisposeScope();
            using var routing = Route([seq.Branches]);
            var ids = tensor(seq.Request.PromptIds.Select(i => (long)i).ToArray(), device: device).unsqueeze(0);   // (1, T)
            var embeds = _model.EmbedWithImages(ids, seq.Features, _imageContextId, SlotsBefore(seq, promptLength));
            var hidden = lm.Forward(embeds, new DecoderInputs { Cache = seq.Cache });
            seq.Prefilled = promptLength;
            PromptDone([seq], lm.Logits(hidden[.., ^1..])[.., 0]);                                       // (1, V)
            if (seq.IsFinished) return;
            if (seq.Length >= _dynamicThreshold) _solo.Add(seq);
            else Restack([(seq, new KvRow(seq.Cache, 0, seq.Length))]);
        }
        catch (Exception e) { seq.Fail(e); }
    }

    /// <summary>The next <paramref name="budget"/> tokens of a long prompt, appended to its own cache.</summary>
    private void PrefillChunk(Sequence seq, long budget)
    {
        try
        {
            var lm = _model.language_model;
            var device = _model.Options.Device;
            int from = seq.Prefilled, to = (int)Math.Min(seq.Request.PromptIds.Count, from + budget);
            using var scope = NewDisposeScope();
            using var routing = Route([seq.Branches]);
            var ids = tensor(seq.Request.PromptIds.Skip(from).Take(to - from).Select(i => (long)i).ToArray(), device: device).unsqueeze(0);
            var embeds = _model.EmbedWithImages(ids, SlotFeatures(seq, from, to), _imageContextId, SlotsBefore(seq, to) - SlotsBefore(seq, from));
            // Positions and the causal mask continue from the cached part, as in one pass.
            var hidden = lm.Forward(embeds, new DecoderInputs { Cache = seq.Cache });
            seq.Prefilled = to;
            if (to < seq.Request.PromptIds.Count) return;
            _prefilling.Remove(seq);
            Remember(seq, seq.Cache!, 0, 0);
            PromptDone([seq], lm.Logits(hidden[.., ^1..])[.., 0]);
            if (!seq.IsFinished) Restack([(seq, new KvRow(seq.Cache!, 0, seq.Length))]);
        }
        catch (Exception e)
        {
            _prefilling.Remove(seq);
            seq.Fail(e);
        }
    }

    /// <summary>
    /// The remaining parts of several prompts in one pass. The pass cache is right-aligned like the decode batch's:
    /// P columns of cached entries, then W = the longest remaining part. Row r's tokens end in the last column; a row
    /// with less than W left takes its cached tail as input again (its cache then gives only its first T_r − W
    /// entries) or, with nothing cached, starts with left padding the KeyMask hides.
    /// </summary>
    private void PrefillBatch(List<Sequence> rows)
    {
        var lm = _model.language_model;
        var device = _model.Options.Device;
        int b = rows.Count;
        var lengths = rows.Select(s => (long)s.Request.PromptIds.Count).ToArray();
        long width = rows.Max(s => s.PromptLeft);
        var past = lengths.Select(t => Math.Max(0, t - width)).ToArray();    // cached entries each row keeps
        long p = past.Max();
        KvCache? pass = null;
        try
        {
            using var scope = NewDisposeScope();
            pass = p == 0
                ? new KvCache(lm.Config, b, width, _model.Options.DType, device)
                : KvCache.Stack(rows.Select((s, r) => new KvRow(s.Cache!, 0, past[r], End: past[r])).ToList(), p + width);
            using var routing = Route(rows.Select(s => s.Branches).ToList());
            var ids = new long[b * width];
            var positions = new long[b * width];
            var starts = new long[b];
            var features = new List<Tensor>();
            long slots = 0;
            for (int r = 0; r < b; r++)
            {
                long pad = width - (lengths[r] - past[r]);
                starts[r] = p - past[r] + pad;
                var prompt = rows[r].Request.PromptIds;
                for (long j = pad; j < width; j++)
                {
                    ids[r * width + j] = prompt[(int)(past[r] + j - pad)];
                    positions[r * width + j] = past[r] + j - pad;
                }
                if (SlotFeatures(rows[r], (int)past[r], (int)lengths[r]) is { } own) features.Add(own);
                slots += SlotsBefore(rows[r], (int)lengths[r]) - SlotsBefore(rows[r], (int)past[r]);
            }
            bool masked = starts.Any(x => x > 0);
            var idTensor = tensor(ids, device: device).view(b, width);
            var embeds = _model.EmbedWithImages(idTensor, features.Count == 0 ? null : cat(features.ToArray(), 0), _imageContextId, slots);
            var inputs = masked
                ? new DecoderInputs
                {
                    Cache = pass,
                    PositionIds = tensor(positions, device: device).view(b, width),
                    KeyMask = arange(p + width, device: device).unsqueeze(0) >= tensor(starts, device: device).view(b, 1),   // (B, P + W)
                }
                : new DecoderInputs { Cache = pass };
            var hidden = lm.Forward(embeds, inputs);
            foreach (var s in rows) { s.Prefilled = s.Request.PromptIds.Count; _prefilling.Remove(s); }
            PromptDone(rows, lm.Logits(hidden[.., ^1..])[.., 0]);                                       // (B, V)
            for (int r = 0; r < b; r++) Remember(rows[r], pass, r, p + width - lengths[r]);
            Restack(rows.Select((s, r) => (s, new KvRow(pass, r, lengths[r]))).Where(x => !x.s.IsFinished).ToList());
        }
        catch (Exception e)
        {
            // One pass served them all: its failure is theirs (the engine and other sequences carry on).
            foreach (var s in rows) { _prefilling.Remove(s); s.Fail(e); }
        }
        finally { pass?.Dispose(); }
    }

    /// <summary>Prompts whose prefill ended: their sampler, the observer, and the first token from (B, V) logits.</summary>
    private void PromptDone(IReadOnlyList<Sequence> rows, Tensor logits)
    {
        foreach (var seq in rows)
        {
            seq.Features?.Dispose();
            seq.Features = null;
            seq.Length = seq.Request.PromptIds.Count;
            seq.Sampler = new Sampler(seq.Request.Sampling);
            Notify(seq, o => o.Prefilled(seq.Request.PromptIds.Count));
        }
        SampleAndAccept(rows, logits);
    }

    /// <summary>
    /// Puts the full blocks of a prefilled prompt that the prefix cache lacks into it: row <paramref name="row"/> of
    /// <paramref name="cache"/>, whose prompt position 0 is column <paramref name="firstColumn"/>.
    /// </summary>
    private void Remember(Sequence seq, KvCache cache, long row, long firstColumn)
    {
        if (_prefixCache is null || seq.Blocks is null) return;
        int have = seq.CachedBlocks, full = seq.Blocks.Length;
        while (have < full && _prefixCache.Contains(seq.Blocks[have])) have++;
        if (have >= full) return;
        using var entries = cache.ExportEntries(row, firstColumn + (long)have * PromptBlocks.Size, (long)(full - have) * PromptBlocks.Size);
        _prefixCache.Add(seq.Blocks, have, entries);
    }

    /// <summary>Image-context tokens among the first <paramref name="tokens"/> of the prompt.</summary>
    private static long SlotsBefore(Sequence seq, int tokens) => seq.SlotsBefore[tokens];

    /// <summary>The image features (n, 1, D) of the image slots among prompt tokens [from, to); null when there are none.</summary>
    private Tensor? SlotFeatures(Sequence seq, int from, int to)
    {
        long first = SlotsBefore(seq, from), count = SlotsBefore(seq, to) - first;
        if (count == 0) return null;
        var all = seq.Features ?? throw new InvalidOperationException("The request's image features are missing.");
        return all.reshape(-1, 1, all.shape[^1]).narrow(0, first, count);
    }

    private void DecodeStep()
    {
        // Sequences about to pass the dynamic-NTK threshold leave the batch for a cache of their own.
        var leaving = _batch.Where(s => s.Length >= _dynamicThreshold).ToList();
        foreach (var seq in leaving)
        {
            seq.Cache = KvCache.Stack([new KvRow(_batchCache!, seq.Row, seq.Length)], seq.Length + seq.Remaining);
        }
        if (leaving.Count > 0)
        {
            LeaveBatch(leaving);
            _solo.AddRange(leaving);
        }

        // Counted before it runs: whoever has a token of this step finds the step counted.
        int stepped = _batch.Count + _solo.Count;
        Interlocked.Increment(ref _stepsByBatch[Math.Min(stepped, _stepsByBatch.Length - 1)]);
        Volatile.Write(ref _decoding, stepped);
        if (_batch.Count > 0) StepBatch();
        foreach (var seq in _solo.ToList())
        {
            // A solo sequence's forward pass is its own: its failure is its own too.
            try { StepSolo(seq); }
            catch (Exception e) { seq.Fail(e); }
        }
        Interlocked.Increment(ref _steps);

        LeaveBatch(_batch.Where(s => s.IsFinished).ToList());
        _solo.RemoveAll(s => s.IsFinished);
        PublishRunning();
    }

    private void StepBatch()
    {
        var lm = _model.language_model;
        var device = _model.Options.Device;
        var cache = _batchCache!;
        int b = _batch.Count;
        _peakBatch = Math.Max(_peakBatch, b);
        using var scope = NewDisposeScope();
        using var routing = Route(_batch.Select(s => s.Branches).ToList());
        _adapters?.RecordBatch(_batch.Select(s => (object?)s.Request.Adapter ?? this).Distinct().Count());
        // The step's inputs in one upload (each copy from pageable host memory waits for the device): the last tokens,
        // the positions, and each row's first valid column — row r's entries are its last Length_r columns, so it is
        // cache.Length − Length_r.
        var inputs = tensor(_batch.Select(s => (long)s.LastToken).Concat(_batch.Select(s => s.Length)).Concat(_batch.Select(s => cache.Length - s.Length)).ToArray(),
            [3, b], device: device);
        var ids = inputs[0].view(b, 1);                                                                     // (B, 1)
        var positions = inputs[1].view(b, 1);                                                               // (B, 1)
        bool ragged = _batch.Any(s => s.Length != cache.Length);
        if (Fused() is { } fused && fused.CanStep(cache))
        {
            var first = ragged ? inputs[2].to_type(ScalarType.Int32) : null;                                // (B)
            var fusedLogits = fused.Step(ids, cache, positions, first, _options.FusedTuning);   // (B, V)
            foreach (var s in _batch) s.Length++;
            SampleAndAccept(_batch, fusedLogits);
            return;
        }
        Tensor? keyMask = null;
        if (ragged)
        {
            // Row r's entries are the last Length_r cached columns; the new token's column is always usable.
            var starts = inputs[2].view(b, 1);
            keyMask = arange(cache.Length + 1, device: device).unsqueeze(0) >= starts;                    // (B, S+1)
        }
        var hidden = lm.Forward(lm.Embed(ids), new DecoderInputs { PositionIds = positions, Cache = cache, KeyMask = keyMask });
        var logits = lm.Logits(hidden)[.., 0];                                                              // (B, V)
        foreach (var s in _batch) s.Length++;
        SampleAndAccept(_batch, logits);
    }

    private void StepSolo(Sequence seq)
    {
        var lm = _model.language_model;
        var device = _model.Options.Device;
        using var scope = NewDisposeScope();
        using var routing = Route([seq.Branches]);
        var ids = tensor(new long[] { seq.LastToken }, device: device).view(1, 1);
        if (Fused() is { } fused && fused.CanStep(seq.Cache!))
        {
            var fusedLogits = fused.Step(ids, seq.Cache!, tuning: _options.FusedTuning);
            seq.Length++;
            SampleAndAccept([seq], fusedLogits);
            return;
        }
        var hidden = lm.Forward(lm.Embed(ids), new DecoderInputs { Cache = seq.Cache });
        seq.Length++;
        SampleAndAccept([seq], lm.Logits(hidden)[.., 0]);
    }

    /// <summary>The model's fused decoder, looked up once (null: turned off, not supported, or CUDA libraries missing).</summary>
    private FusedDecoder? Fused()
    {
        if (_fusedResolved) return _fused;
        _fusedResolved = true;
        // The kernels read the base weights only: they would drop every row's LoRA delta (FusedDecodeOffReason).
        if (_adapters is not null) return null;
        if (_model.Options.Device.type == DeviceType.CUDA)
            _fused = FusedDecoder.TryGet(_model.language_model, _options.FusedDecode, out _);
        return _fused;
    }

    /// <summary>Routes the rows of the next pass to their adapters (a no-op routing when no adapters are served).</summary>
    private LoraRouting? Route(IReadOnlyList<LoraBranches?> rows) =>
        _adapters is null ? null : LoraRouting.Begin(rows, _model.Options.Device);

    /// <summary>Rows without a sampler of their own (finished meanwhile) are drawn greedily and ignored.</summary>
    private static readonly Sampler FinishedRow = new(new SamplingOptions());

    /// <summary>
    /// Each row's next token from (B, V) logits, every row at once (Sampler.Sample: one download for the batch, whatever
    /// each asks for), then accepted row by row; a row whose scores are not finite fails alone (an error of the batched
    /// sampling itself fails the step's rows).
    /// </summary>
    private static void SampleAndAccept(IReadOnlyList<Sequence> rows, Tensor logits)
    {
        SampledRows sampled;
        try
        {
            using var scope = NewDisposeScope();
            sampled = Sampler.Sample(rows.Select(s => s.Sampler ?? FinishedRow).ToList(), logits, SeenIds(rows, logits.device));
        }
        catch (Exception e)
        {
            foreach (var seq in rows.Where(s => !s.IsFinished)) seq.Fail(e);
            return;
        }
        for (int i = 0; i < rows.Count; i++)
        {
            var seq = rows[i];
            if (seq.IsFinished) continue;   // e.g. failed by its observer when its prefill ended
            try
            {
                if (!sampled.Finite[i]) throw new NonFiniteScoresException();
                Accept(seq, (int)sampled.Ids[i]);
            }
            catch (Exception e)
            {
                seq.Fail(e);
            }
        }
    }

    /// <summary>
    /// (B, L) prompt + generated ids of the rows with a repetition penalty, each padded with its own first id (a
    /// repeated id is penalised once: scatter writes the same value); rows without one hold a 0 they are not changed
    /// by. Null when no row has one.
    /// </summary>
    private static Tensor? SeenIds(IReadOnlyList<Sequence> rows, Device device)
    {
        if (rows.All(s => s.Request.Sampling.RepetitionPenalty == 1.0)) return null;
        var lists = rows.Select(s => s.Request.Sampling.RepetitionPenalty == 1.0 ? [0L]
            : s.Request.PromptIds.Select(i => (long)i).Concat(s.Generated.Select(i => (long)i)).ToArray()).ToList();
        int width = lists.Max(l => l.Length);
        var ids = new long[rows.Count * width];
        for (int r = 0; r < lists.Count; r++)
            for (int j = 0; j < width; j++) ids[r * width + j] = j < lists[r].Length ? lists[r][j] : lists[r][0];
        return tensor(ids, [rows.Count, width], device: device);
    }

    /// <summary>
    /// The stop id ends a sequence without being part of it; the token limit ends it after the token. Its callers fail
    /// the sequence alone if this throws (the observer included).
    /// </summary>
    private static void Accept(Sequence seq, int id)
    {
        if (seq.Cancelled) { seq.Finish(FinishReason.Cancelled); return; }
        if (seq.Request.StopIds.Contains(id)) { seq.Finish(FinishReason.Stop); return; }
        // Before the token reaches the reader, so a client that has read its answer finds it counted.
        seq.Request.Observer?.Token();
        seq.Generated.Add(id);
        seq.LastToken = id;
        seq.Tokens.Writer.TryWrite(id);
        if (seq.Generated.Count >= seq.Request.Sampling.MaxNewTokens) seq.Finish(FinishReason.Length);
    }

    /// <summary>
    /// Rebuilds the batch cache from the running rows plus <paramref name="joining"/>, each with the row of its prefill
    /// cache; the joining sequences' own caches are released (a shared pass cache is its caller's to dispose).
    /// </summary>
    private void Restack(IReadOnlyList<(Sequence Seq, KvRow Row)> joining)
    {
        var cache = _batchCache;
        // In place where the rows fit: spare rows of the storage, no longer than the batch's entries, and room for
        // their answers in its columns. Otherwise the batch is rebuilt (with spare rows for later joins).
        if (cache is not null && joining.Count > 0 && cache.Length + joining.Max(j => j.Seq.Remaining) <= cache.Capacity
            && cache.TryAppendRows(joining.Select(j => j.Row).ToList()))
        {
            foreach (var (seq, _) in joining) { seq.Row = _batch.Count; _batch.Add(seq); }
        }
        else
        {
            var rows = _batch.Select(s => new KvRow(cache!, s.Row, s.Length)).Concat(joining.Select(j => j.Row)).ToList();
            _batch.AddRange(joining.Select(j => j.Seq));
            Interlocked.Increment(ref _batchRebuilds);
            KvCache? stacked = null;
            if (_batch.Count > 0)
            {
                // Room for the longest answer still to come, so no row needs the cache to grow while decoding.
                long length = _batch.Max(s => s.Length), remaining = _batch.Max(s => s.Remaining);
                stacked = KvCache.Stack(rows, length + remaining, SpareRows(length + remaining));
            }
            _batchCache?.Dispose();
            _batchCache = stacked;
            for (int i = 0; i < _batch.Count; i++) _batch[i].Row = i;
        }
        foreach (var (seq, _) in joining) { seq.Cache?.Dispose(); seq.Cache = null; }
    }

    /// <summary>Rows to allocate for a rebuilt batch cache of <paramref name="columns"/>: up to MaxBatch, within the KV budget.</summary>
    private long SpareRows(long columns) => Math.Clamp(_options.MaxCacheTokens / Math.Max(columns, 1), _batch.Count, Math.Max(_batch.Count, _options.MaxBatch));

    /// <summary>
    /// Takes <paramref name="leaving"/> out of the batch in place: each leaving row gets the batch's last row (one row
    /// copied per layer), highest rows first so that a row moved down is never one that leaves.
    /// </summary>
    private void LeaveBatch(IReadOnlyCollection<Sequence> leaving)
    {
        if (leaving.Count == 0) return;
        foreach (var seq in leaving.OrderByDescending(s => s.Row))
        {
            int last = _batch.Count - 1;
            _batchCache!.RemoveRow(seq.Row);
            if (seq.Row != last)
            {
                var moved = _batch[last];
                _batch[seq.Row] = moved;
                moved.Row = seq.Row;
            }
            _batch.RemoveAt(last);
        }
        if (_batch.Count == 0)
        {
            _batchCache?.Dispose();
            _batchCache = null;
        }
    }

    private void PublishRunning()
    {
        Volatile.Write(ref _running, Admitted);
        // What the caches really hold (a tensor's shape is host metadata: no device sync); solo caches grow by doubling.
        long slots = _batchCache is { } batch ? batch.RowCapacity * batch.Capacity : 0;   // spare rows are held too
        foreach (var s in _solo.Concat(_prefilling)) slots += s.Cache?.Capacity ?? 0;
        Interlocked.Exchange(ref _cacheSlots, slots);
    }

    /// <summary>Calls the request's observer where no per-sequence catch is around: one that throws fails its own request only.</summary>
    private static void Notify(Sequence seq, Action<IGenerationObserver> call)
    {
        if (seq.Request.Observer is not { } observer) return;
        try { call(observer); }
        catch (Exception e) { seq.Fail(e); }
    }

    private void FailRunning(Exception e)
    {
        foreach (var s in _batch.Concat(_solo).Concat(_prefilling)) s.Fail(e);
        _batch.Clear();
        _solo.Clear();
        _prefilling.Clear();
        _batchCache?.Dispose();
        _batchCache = null;
        PublishRunning();
    }

    private void FailAll()
    {
        var closed = new ObjectDisposedException(nameof(InferenceEngine), "The inference engine was shut down.");
        FailRunning(closed);
        while (_pending.TryDequeue(out var s)) { s.Request.Pixels?.Dispose(); s.Fail(closed); }
    }

    private void Wake()
    {
        try { _wake.Release(); }
        catch (ObjectDisposedException) { }
    }

    public void Dispose()
    {
        if (_stopping) return;
        _stopping = true;
        _wake.Release();
        _thread.Join();
        _wake.Dispose();
        _imageCache?.Dispose();
        // Every request has ended (and released its adapter): the weights of all adapters go now.
        _adapters?.Dispose();
    }

    /// <summary>A request while it runs: its place in the batch, its cache (while prefilling or decoding alone), its output.</summary>
    private sealed class Sequence(GenerationRequest request)
    {
        public GenerationRequest Request { get; } = request;
        public Channel<int> Tokens { get; } = Channel.CreateUnbounded<int>(new UnboundedChannelOptions { SingleWriter = true, SingleReader = true });
        public TaskCompletionSource<GenerationResult> Done { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public List<int> Generated { get; } = [];
        public CancellationTokenRegistration Registration { get; set; }
        public volatile bool Cancelled;
        private int _adapterReleased;
        public Tensor? Features { get; set; }
        /// <summary>Each image's cache key and tiles (null when the cache is off or the request has no image).</summary>
        public List<(ImageKey Key, long Offset, long Tiles)>? ImageKeys { get; init; }
        public KvCache? Cache { get; set; }
        public Sampler? Sampler { get; set; }
        public long Length { get; set; } = request.PromptIds.Count;   // tokens in the cache (the prompt until it is prefilled)
        /// <summary>Full-block hashes of the prompt for the prefix cache (null: off, or a prompt prefilled in one pass).</summary>
        public BlockHash[]? Blocks { get; init; }
        /// <summary>Image-context tokens before each prompt position (<see cref="InferenceEngine.SlotCounts"/>).</summary>
        public required int[] SlotsBefore { get; init; }
        /// <summary>Prompt tokens in the sequence's own cache so far (a cached prefix, then the chunks prefilled).</summary>
        public int Prefilled { get; set; }
        /// <summary>Leading prompt blocks that came from the prefix cache.</summary>
        public int CachedBlocks { get; set; }
        /// <summary>Their tokens, for the request's usage (read by other threads).</summary>
        public int CachedTokens;
        /// <summary>Decode steps the engine had run when the request was admitted.</summary>
        public long AdmittedAtStep { get; set; }
        /// <summary>Whether the request's image tiles still wait for their vision pass.</summary>
        public bool ImagesPending { get; set; } = request.Pixels is not null;
        /// <summary>Prompt tokens still to prefill.</summary>
        public long PromptLeft => Request.PromptIds.Count - Prefilled;
        public int Row { get; set; }
        public int LastToken { get; set; }
        public bool IsFinished => Done.Task.IsCompleted;
        public LoraBranches? Branches => Request.Adapter?.Branches;
        public long Remaining => Request.Sampling.MaxNewTokens - Generated.Count;

        public void Finish(FinishReason reason)
        {
            Release();
            Tokens.Writer.TryComplete();
            Done.TrySetResult(new GenerationResult(Generated.ToArray(), reason, Request.PromptIds.Count));
        }

        public void Fail(Exception e)
        {
            Release();
            Tokens.Writer.TryComplete(e);
            Done.TrySetException(e);
        }

        private void Release()
        {
            // The lease once: Finish and Fail may both be reached for a sequence (the rest here is idempotent).
            if (Interlocked.Exchange(ref _adapterReleased, 1) == 0) Request.Adapter?.Release();
            Registration.Dispose();
            Features?.Dispose(); Features = null;
            if (ImagesPending) { Request.Pixels?.Dispose(); ImagesPending = false; }
            Cache?.Dispose(); Cache = null;
            Sampler?.Dispose(); Sampler = null;
        }
    }
}

/// <summary>
/// <see cref="InferenceEngine.Stats"/>: <paramref name="Decoding"/> is the number of sequences of the latest decode step
/// (0 when idle); <paramref name="CacheSlots"/> the KV-cache slots (rows × columns) the running sequences' caches hold.
/// </summary>
public readonly record struct EngineStats(int Running, int Queued, int PeakBatch, long Steps, int Decoding = 0, long CacheSlots = 0);
