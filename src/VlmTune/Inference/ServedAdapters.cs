using System.Collections.Immutable;
using VlmTune.Checkpoints;
using VlmTune.Models;

namespace VlmTune.Inference;

/// <summary>What a model id (the base model's or an adapter's) may look like: what clients put in <c>model</c>, and a URL segment.</summary>
public static class ModelNames
{
    public const int MaxLength = 64;

    /// <summary>Why <paramref name="name"/> cannot be a model id; null when it can.</summary>
    public static string? Problem(string? name)
    {
        bool ok = name is { Length: > 0 and <= MaxLength } && char.IsAsciiLetterOrDigit(name[0])
            && name.All(c => char.IsAsciiLetterOrDigit(c) || c is '.' or '_' or '-' or ':');
        return ok ? null : $"'{Clip(name ?? "")}' is not a model name: use 1 to {MaxLength} letters, digits, '.', '_', '-' or ':', starting with a letter or digit";
    }

    internal static string Clip(string s) => s.Length <= MaxLength ? s : s[..MaxLength] + "…";
}

/// <summary>A request names a model this engine does not serve (the OpenAI API's 404 <c>model_not_found</c>).</summary>
public sealed class UnknownModelException(string message) : InvalidGenerationRequestException(message, "model");

/// <summary>An adapter that cannot be served as given: a bad name, a folder that is not an adapter of this base (400).</summary>
public sealed class InvalidAdapterException(string message, string param) : VlmTuneException(message)
{
    /// <summary>The field at fault: <c>name</c> or <c>path</c>.</summary>
    public string Param { get; } = param;
}

/// <summary>The name is taken (by a served adapter or the base model): 409.</summary>
public sealed class AdapterConflictException(string message) : VlmTuneException(message);

/// <summary>
/// One adapter served beside the base model. Requests hold a lease on it from <see cref="InferenceEngine.Submit"/> to
/// their end; an unloaded adapter takes no new requests and frees its weights when its last request ends.
/// </summary>
public sealed class ServedAdapter
{
    private readonly Lock _lock = new();
    private int _leases;
    private bool _retired;

    private static long _lastVisionKey;

    internal ServedAdapter(ServedAdapters owner, string name, string description, LoraBranches branches, bool adaptsVision)
    {
        Owner = owner; Name = name; Description = description; Branches = branches;
        VisionKey = adaptsVision ? Interlocked.Increment(ref _lastVisionKey) : 0;
        KvKey = Interlocked.Increment(ref _lastKvKey);
    }

    private static long _lastKvKey;

    /// <summary>
    /// Whose keys and values this adapter's prompts get (the prefix cache's key): an id of its own, never given again,
    /// since its LoRA changes them (the base's is 0).
    /// </summary>
    internal long KvKey { get; }

    internal ServedAdapters Owner { get; }
    internal LoraBranches Branches { get; }

    /// <summary>
    /// Whose image features this adapter's requests get (the engine's image-feature cache key): 0 when it has no LoRA on
    /// the vision encoder or the projector (its features are the base's), else an id of its own, never given again
    /// (an adapter loaded later under the same name gets another).
    /// </summary>
    internal long VisionKey { get; }

    public string Name { get; }
    /// <summary>What the adapter holds, in one line (<see cref="AdapterCheckpoint.Describe"/>).</summary>
    public string Description { get; }
    public DateTimeOffset Loaded { get; } = DateTimeOffset.UtcNow;

    /// <summary>Requests that hold it now (queued or decoding).</summary>
    public int Running { get { lock (_lock) return _leases; } }

    /// <summary>Whether its weights are freed: it was unloaded and its last request has ended.</summary>
    public bool Released => Branches.IsDisposed;

    internal bool TryAcquire()
    {
        lock (_lock)
        {
            if (_retired) return false;
            _leases++;
            return true;
        }
    }

    internal void Release()
    {
        lock (_lock)
        {
            if (--_leases == 0 && _retired) Branches.Dispose();
        }
    }

    internal void Retire()
    {
        lock (_lock)
        {
            _retired = true;
            if (_leases == 0) Branches.Dispose();
        }
    }
}

/// <summary>
/// The adapters an engine serves over one unmerged base model, by model id (batched LoRA: requests for different
/// adapters and for the base share one decode batch; <see cref="LoraRouting"/>). Loading and unloading may happen while
/// the engine runs: an adapter's branches live beside the model, so neither touches what a running request reads.
/// Unloading removes the name at once (new requests get <see cref="UnknownModelException"/>); requests already
/// running finish with the adapter, whose weights are freed when the last of them ends.
/// </summary>
public sealed class ServedAdapters : IDisposable
{
    private readonly Lock _changes = new();   // one load or unload at a time, so a name is checked and taken at once
    private ImmutableList<ServedAdapter> _adapters = [];
    private int _peakModels;

    /// <param name="baseModelId">The base model's id: no adapter may take it.</param>
    public ServedAdapters(InternVLChatModel model, string baseModelId)
    {
        if (PeftAdapter.LoraLinears(model).Any())
            throw new VlmTuneException("the model has LoRA branches of its own (an adapter applied unmerged); serve adapters over a freshly loaded base model.");
        Model = model;
        BaseModelId = baseModelId;
    }

    public InternVLChatModel Model { get; }
    public string BaseModelId { get; }

    /// <summary>The adapters served now, in the order they were loaded.</summary>
    public IReadOnlyList<ServedAdapter> All => Volatile.Read(ref _adapters);

    public ServedAdapter? Find(string name) => All.FirstOrDefault(a => a.Name == name);

    /// <summary>
    /// The most models (adapters, and the base when it had rows) whose rows shared one decode step: 1 while every
    /// batch held one model's requests.
    /// </summary>
    public int PeakModelsInBatch => Volatile.Read(ref _peakModels);

    internal void RecordBatch(int models)
    {
        int seen;
        while (models > (seen = Volatile.Read(ref _peakModels)) && Interlocked.CompareExchange(ref _peakModels, models, seen) != seen) { }
    }

    /// <summary>
    /// Loads the adapter in <paramref name="dir"/> under <paramref name="name"/>. Throws
    /// <see cref="InvalidAdapterException"/> for a bad name or an adapter that does not fit (every problem at once,
    /// naming files under <paramref name="dir"/>), <see cref="AdapterConflictException"/> for a name in use.
    /// </summary>
    public ServedAdapter Load(string name, string dir)
    {
        if (ModelNames.Problem(name) is { } problem) throw new InvalidAdapterException(problem + ".", "name");
        lock (_changes)
        {
            if (name == BaseModelId) throw new AdapterConflictException($"'{name}' is the base model's id; give the adapter another name.");
            if (Find(name) is not null) throw new AdapterConflictException($"an adapter named '{name}' is already served; unload it first or pick another name.");
            LoraBranches branches;
            string description;
            try { (branches, description) = AdapterLoader.LoadBranches(Model, dir, name); }
            catch (Exception e) when (e is VlmTuneException or IOException or UnauthorizedAccessException) { throw new InvalidAdapterException(e.Message, "path"); }
            // LoRA on the ViT or the projector changes the image features; on the LLM only, they are the base's.
            bool adaptsVision = Linear.AllIn(Model.vision_model).Concat(Linear.AllIn(Model.mlp1)).Any(l => branches.For(l.Linear) is not null);
            var adapter = new ServedAdapter(this, name, description, branches, adaptsVision);
            Volatile.Write(ref _adapters, _adapters.Add(adapter));
            return adapter;
        }
    }

    /// <summary>
    /// Stops serving <paramref name="name"/>: new requests for it are refused from now on, running ones finish with
    /// it, and its weights are freed when the last one ends (<see cref="ServedAdapter.Released"/>).
    /// </summary>
    public ServedAdapter Unload(string name)
    {
        lock (_changes)
        {
            if (name == BaseModelId) throw new InvalidAdapterException($"'{name}' is the base model, which cannot be unloaded.", "name");
            var adapter = Find(name) ?? throw new UnknownModelException($"no adapter named '{ModelNames.Clip(name)}' is served.");
            Volatile.Write(ref _adapters, _adapters.Remove(adapter));
            adapter.Retire();
            return adapter;
        }
    }

    /// <summary>Unloads every adapter (each freed once its last request ends).</summary>
    public void Dispose()
    {
        lock (_changes)
        {
            foreach (var a in _adapters) a.Retire();
            Volatile.Write(ref _adapters, []);
        }
    }
}
