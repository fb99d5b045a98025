using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using VlmTune.IO;
using VlmTune.Models;
using VlmTune.Quantization;
using VlmTune.Text;
using static TorchSharp.torch;

namespace VlmTune.Checkpoints;

public sealed record MergeOptions
{
    public required string BaseDir { get; init; }
    public required string AdapterDir { get; init; }
    public required string OutDir { get; init; }
    /// <summary>Dtype of the floating-point tensors written; null keeps each tensor's stored dtype.</summary>
    public ScalarType? DType { get; init; }
    /// <summary>Replace a non-empty <see cref="OutDir"/>.</summary>
    public bool Force { get; init; }
    /// <summary>Merge LLM LoRA into the NF4-dequantised decoder weights (what QLoRA trained against) instead of the original ones.</summary>
    public bool MergeIntoNf4 { get; init; }
    /// <summary>The layout written: the official InternVL one, or transformers' InternVLForConditionalGeneration (<see cref="HfLayout"/>).</summary>
    public CheckpointLayout Layout { get; init; } = CheckpointLayout.Official;
    /// <summary>Largest shard in bytes (transformers' default "5GB"); a single larger tensor gets a shard of its own.</summary>
    public long MaxShardBytes { get; init; } = ModelMerger.DefaultMaxShardBytes;
    /// <summary>Reload the output and compare its logits with base + adapter; null skips the check.</summary>
    public MergeVerifyOptions? Verify { get; init; } = new();
    public Action<MergeProgress>? Progress { get; init; }
    public Action<string>? Log { get; init; }
    /// <summary>Test aid: the pause point of <see cref="RuntimeSwitches.TestPause"/> (VLMTUNE_TEST_PAUSE); null: none.</summary>
    public string? TestPause { get; init; }
}

/// <summary>Progress of the tensor loop: <paramref name="Done"/> of <paramref name="Total"/> written, the last being <paramref name="Tensor"/>.</summary>
public sealed record MergeProgress(int Done, int Total, string Tensor);

public sealed record MergeResult
{
    public required string OutDir { get; init; }
    public required int Tensors { get; init; }
    public required int LoraModules { get; init; }
    public required int ReplacedTensors { get; init; }
    /// <summary>Weight files written (file names, in order).</summary>
    public required IReadOnlyList<string> Shards { get; init; }
    public required long TotalBytes { get; init; }
    public MergeVerifyResult? Verify { get; init; }
}

/// <summary>
/// <c>vlmtune merge</c>: base model folder + adapter → a model folder in the official InternVL layout or the Hugging
/// Face one. Tensors are streamed one at a time (never the whole model in memory): each LoRA branch is folded in as
/// PEFT's merge_and_unload does (W + (B·A)·alpha/r in fp32, rounded once to the output dtype), trained full weights
/// replace the base ones, the rest is copied; in the hf layout each merged tensor is then renamed, or cut into q/k/v.
/// Everything is written into a temporary sibling folder, verified, and renamed at the end; the
/// temporaries a killed merge left are removed when the next one starts. See docs/merge.md.
/// </summary>
public static class ModelMerger
{
    public const long DefaultMaxShardBytes = 5_000_000_000;

    /// <summary>Non-weight files of a model folder that belong to the merged model (plus every *.py remote-code file).</summary>
    public static readonly IReadOnlyList<string> CopiedFilePatterns =
    [
        "*.py", "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "generation_config.json",
        "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
    ];

    /// <summary>
    /// What an hf-layout folder takes from the base: the tokenizer files as they are (with the tokenizer's own remote code,
    /// e.g. InternLM2's), not the model's remote code; preprocessor_config.json and processor_config.json are written anew.
    /// </summary>
    public static readonly IReadOnlyList<string> HfCopiedFilePatterns =
    [
        "tokenization_*.py", "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
        "generation_config.json", "chat_template.json", "chat_template.jinja",
    ];

    public static MergeResult Merge(MergeOptions options, CancellationToken cancel = default)
    {
        var log = options.Log ?? (_ => { });
        string baseDir = FullPath(options.BaseDir), outDir = FullPath(options.OutDir), adapterDir = FullPath(options.AdapterDir);
        CheckPaths(baseDir, adapterDir, outDir, options);
        string parent = Path.GetDirectoryName(outDir)!, outName = Path.GetFileName(outDir);
        RemoveStaleTemporaries(parent, outName, log);

        var config = InternVLConfig.Load(baseDir);                     // validates the base config before any work
        bool hfOut = options.Layout == CheckpointLayout.Hf;
        int imageTokenId = hfOut ? ImageContextId(baseDir) : 0;
        using var checkpoint = ModelWeights.Open(baseDir, config);     // official names, whatever the base's layout
        var order = checkpoint.Names.OrderBy(n => Path.GetFileName(checkpoint.FileOf(n)), StringComparer.Ordinal)
            .ThenBy(n => checkpoint.Entry(n).Begin).ToList();         // the base's own tensor order
        var shapes = order.ToDictionary(n => n, n => checkpoint.Entry(n).Shape);
        using var adapter = AdapterCheckpoint.Open(adapterDir, shapes);
        if (options.MergeIntoNf4 && adapter.TrainingMode is { } mode && mode != "qlora")
            throw new VlmTuneException($"--merge-into-nf4: {adapter.Dir} was trained in {mode} mode on unquantised weights; the option is for QLoRA adapters.");
        if (options.MergeIntoNf4 && !adapter.Loras.Any(l => l.Modules.Any(m => IsDecoderLinear(m.WeightName, shapes))))
            throw new VlmTuneException($"--merge-into-nf4: {adapter.Dir} has no LoRA on the LLM's decoder layers; there is nothing to merge into NF4 weights.");
        log($"base {baseDir} ({order.Count} tensors); {adapter.Describe()}");
        foreach (var trainedOn in adapter.Loras.Select(l => l.Config.BaseModelNameOrPath).Distinct())
            if (trainedOn is not null && Path.IsPathRooted(trainedOn) && Directory.Exists(trainedOn) && FullPath(trainedOn) != baseDir)
                log($"note: the adapter was trained on {trainedOn}, not on --base {baseDir}; make sure they hold the same weights");
        if (adapter.TrainingMode == "qlora")
            log(options.MergeIntoNf4
                ? "qlora: merging into the NF4-dequantised decoder weights (--merge-into-nf4)"
                : "qlora: merging into the original base weights, as XTuner does (--merge-into-nf4 merges into the NF4-dequantised ones)");

        var lora = new Dictionary<string, (LoraAdapterPart Part, LoraModule Module)>(StringComparer.Ordinal);
        foreach (var part in adapter.Loras)
            foreach (var m in part.Modules)
                if (!lora.TryAdd(m.WeightName, (part, m)))
                    throw new CheckpointException($"{adapter.Dir}: '{m.Module}' has LoRA branches in two adapters ({lora[m.WeightName].Part.Dir} and {part.Dir}).");

        if (config.Layout == CheckpointLayout.Hf && !hfOut)
            log("note: the base is in the hf layout, which has no InternVL remote code (*.py); transformers needs those files beside an official-layout folder");
        if (hfOut && config.Template != HfConfig.InferredTemplate)
            log($"note: the hf layout has no template field; VlmTune reads hf folders with {HfConfig.InferredTemplate}, not this base's {config.Template} (--system sets the system message)");

        // Each output tensor: its place in the files, and the merged official tensor (or part of it) it is cut from.
        var outputs = new List<(SafetensorsLayout Entry, string Official, int Part, FusedQkv? Fused)>();
        foreach (var n in order)
        {
            var dtype = OutputDType(checkpoint.Entry(n).DType, options.DType);
            if (!hfOut) { outputs.Add((new SafetensorsLayout(n, dtype, shapes[n]), n, 0, null)); continue; }
            var hf = HfLayout.ToHf(n, shapes[n], config);
            for (int i = 0; i < hf.Names.Count; i++) outputs.Add((new SafetensorsLayout(hf.Names[i], dtype, hf.Shapes[i]), n, i, hf.Fused));
        }
        var layout = outputs.Select(o => o.Entry).ToList();
        var source = outputs.ToDictionary(o => o.Entry.Name, StringComparer.Ordinal);
        var shards = PlanShards(layout, options.MaxShardBytes);

        string temp = OwnedTemporary.Name(Path.Combine(parent, $".{outName}{TempMarker}"));
        Directory.CreateDirectory(temp);
        // The q/k/v parts of the fused tensor merged last: they are written one after the other.
        string? splitOf = null;
        Tensor?[] splitParts = [];
        try
        {
            int done = 0;
            Tensor Produce(SafetensorsLayout entry)
            {
                cancel.ThrowIfCancellationRequested();
                var (_, official, part, fused) = source[entry.Name];
                Tensor t;
                if (fused is null) t = MergedTensor(official, entry.DType, checkpoint, adapter.FullWeights, lora, options.MergeIntoNf4, shapes);
                else
                {
                    if (splitOf != official)
                    {
                        foreach (var left in splitParts) left?.Dispose();
                        using var whole = MergedTensor(official, entry.DType, checkpoint, adapter.FullWeights, lora, options.MergeIntoNf4, shapes);
                        splitParts = fused.Split(whole, config);
                        splitOf = official;
                    }
                    t = splitParts[part] ?? throw new InvalidOperationException($"'{entry.Name}' was written twice.");
                    splitParts[part] = null;                                  // the writer disposes it
                }
                options.Progress?.Invoke(new MergeProgress(++done, layout.Count, entry.Name));
                return t;
            }
            foreach (var (file, entries) in shards)
            {
                SafetensorsWriter.WriteStreaming(Path.Combine(temp, file), entries, i => Produce(entries[i]), disposeProduced: true);
                Diagnostics.TestPause.At(options.TestPause, "merge-shard", cancel);
            }
            if (shards.Count > 1) WriteIndex(temp, shards);
            WriteConfig(baseDir, temp, config, options.DType, options.Layout, imageTokenId);
            var tokenizerConfig = TokenizerConfigWithChatTemplate(baseDir, config, log, hfOut);
            // hf: the processor's chat template too (chat_template.jinja, what InternVLProcessor.apply_chat_template and
            // recent transformers' tokenizers read), the same text as tokenizer_config.json's; a base's own is replaced.
            string? processorTemplate = hfOut ? ChatTemplateOfFolder(baseDir, tokenizerConfig) : null;
            foreach (var file in FilesToCopy(baseDir, options.Layout))
            {
                var name = Path.GetFileName(file);
                var destination = Path.Combine(temp, name);
                if (tokenizerConfig is not null && name == ChatTemplateExport.TokenizerConfigFile)
                    AtomicFile.WriteAllText(destination, tokenizerConfig);
                else if (processorTemplate is not null && name is ChatTemplateExport.JinjaFile or "chat_template.json") continue;
                else CopyContent(file, destination);
            }
            if (processorTemplate is not null) AtomicFile.WriteAllText(Path.Combine(temp, ChatTemplateExport.JinjaFile), processorTemplate);
            if (hfOut)
            {
                var indented = new JsonSerializerOptions { WriteIndented = true };
                AtomicFile.WriteAllText(Path.Combine(temp, "preprocessor_config.json"), HfConfig.PreprocessorConfig(config).ToJsonString(indented));
                AtomicFile.WriteAllText(Path.Combine(temp, "processor_config.json"), HfConfig.ProcessorConfig(config).ToJsonString(indented));
            }
            long total = layout.Sum(e => e.ByteLength);
            log($"wrote {layout.Count} tensors ({FormatBytes(total)}) in {shards.Count} file{(shards.Count == 1 ? "" : "s")}: " +
                $"{lora.Count} LoRA layers merged, {adapter.FullWeights?.Entries.Count ?? 0} tensors replaced by trained weights");

            MergeVerifyResult? verify = null;
            if (options.Verify is { } v)
            {
                cancel.ThrowIfCancellationRequested();
                verify = MergeVerifier.Verify(baseDir, adapterDir, temp, new AdapterApplyOptions { Nf4Base = options.MergeIntoNf4 }, v, cancel);
                log($"verify: {verify}");
                if (!verify.Passed)
                    throw new VlmTuneException($"verification failed: {verify}; the merged model does not reproduce base + adapter. Nothing was written to {outDir}.");
            }
            cancel.ThrowIfCancellationRequested();
            Publish(temp, outDir);
            return new MergeResult
            {
                OutDir = outDir, Tensors = layout.Count, LoraModules = lora.Count, ReplacedTensors = adapter.FullWeights?.Entries.Count ?? 0,
                Shards = shards.Select(s => s.File).ToList(), TotalBytes = total, Verify = verify,
            };
        }
        catch (Exception e) when (DiskFull.Is(e))
        {
            TryDelete(temp);
            throw DiskFull.Error("the merged model", parent, $"nothing was written to {outDir}", e);
        }
        catch
        {
            TryDelete(temp);
            throw;
        }
        finally
        {
            foreach (var left in splitParts) left?.Dispose();
        }
    }

    /// <summary>The hf config's image_token_id: the id of &lt;IMG_CONTEXT&gt; among the base tokenizer's added tokens.</summary>
    private static int ImageContextId(string baseDir)
    {
        var tokens = VlmTune.Text.TokenizerFileConfig.Read(baseDir).AddedTokens;
        return tokens.TryGetValue("<IMG_CONTEXT>", out var id)
            ? id
            : throw new VlmTuneException($"merge --layout hf: {baseDir} has no <IMG_CONTEXT> among its tokenizer's added tokens (tokenizer_config.json, added_tokens.json), so the hf config's image_token_id cannot be written.");
    }

    private const string TempMarker = ".merge-tmp-", OldMarker = ".merge-old-";

    /// <summary>
    /// Removes what killed merges into <paramref name="outName"/> left: temporary folders (a whole model each), and a
    /// replaced output whose deletion was cut short — only when the new output is in place (else it is the only copy).
    /// </summary>
    private static void RemoveStaleTemporaries(string parent, string outName, Action<string> log)
    {
        var removed = OwnedTemporary.RemoveStale(parent, n => n.StartsWith($".{outName}{TempMarker}", StringComparison.Ordinal)).ToList();
        if (Directory.Exists(Path.Combine(parent, outName)))
            removed.AddRange(OwnedTemporary.RemoveStale(parent, n => n.StartsWith($".{outName}{OldMarker}", StringComparison.Ordinal)));
        foreach (var path in removed) log($"removed {path}, left by an interrupted merge");
    }

    private static string FullPath(string path) => Path.TrimEndingDirectorySeparator(Path.GetFullPath(path));

    /// <summary>All path problems at once, before anything is read or written.</summary>
    private static void CheckPaths(string baseDir, string adapterDir, string outDir, MergeOptions options)
    {
        var problems = new List<string>();
        if (!Directory.Exists(baseDir)) problems.Add($"--base {baseDir}: folder not found");
        else if (!File.Exists(Path.Combine(baseDir, "config.json"))) problems.Add($"--base {baseDir}: no config.json (not an InternVL2 model folder)");
        if (!Directory.Exists(adapterDir)) problems.Add($"--adapter {adapterDir}: folder not found");
        // Compared as the folders they are (symlinks followed), never as the strings given.
        foreach (var (flag, what, input) in new[] { ("--base", "base model", baseDir), ("--adapter", "adapter", adapterDir) })
        {
            string real = RealPath.Of(input), realOut = RealPath.Of(outDir);
            string shown = real == input ? input : $"{input} (that is {real})";
            if (real == realOut) problems.Add($"--out is the {what} folder {shown}; write the merged model to a new folder");
            else if (RealPath.IsSameOrInsideResolved(real, realOut)) problems.Add($"--out {outDir} contains the {what} folder {shown}; replacing it would delete the {what}");
            else if (RealPath.IsSameOrInsideResolved(realOut, real)) problems.Add($"--out {outDir} is inside the {what} folder {shown}; write the merged model outside it");
        }
        if (File.Exists(outDir)) problems.Add($"--out {outDir} is a file");
        else if (Directory.Exists(outDir) && Directory.EnumerateFileSystemEntries(outDir).Any() && !options.Force)
            problems.Add($"--out {outDir} is not empty; pass --force to replace it");
        if (options.MaxShardBytes <= 0) problems.Add($"--max-shard-size must be positive (got {options.MaxShardBytes} bytes)");
        if (options.DType is { } d && d is not (ScalarType.BFloat16 or ScalarType.Float16 or ScalarType.Float32))
            problems.Add($"--dtype {d} is not supported (bfloat16, float16, float32)");
        if (problems.Count > 0) throw new VlmTuneException("merge: " + string.Join("; ", problems) + ".");
    }

    private static ScalarType OutputDType(string stored, ScalarType? requested)
    {
        var t = SafetensorsFile.ToScalarType(stored);
        bool floating = t is ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float32 or ScalarType.Float64;
        return floating && requested is { } r ? r : t;
    }

    /// <summary>The LLM decoder's linear weights: those QLoRA stores in NF4 (every 2-D weight of a decoder layer).</summary>
    private static bool IsDecoderLinear(string name, IReadOnlyDictionary<string, long[]> shapes) =>
        name.StartsWith("language_model.model.layers.", StringComparison.Ordinal) && name.EndsWith(".weight", StringComparison.Ordinal)
        && shapes.TryGetValue(name, out var s) && s.Length == 2;

    /// <summary>One merged official tensor: trained replacement or base value, NF4 round trip if asked, plus the LoRA delta, in the output dtype.</summary>
    private static Tensor MergedTensor(string name, ScalarType dtype, ModelWeights checkpoint, SafetensorsFile? full,
        Dictionary<string, (LoraAdapterPart Part, LoraModule Module)> lora, bool intoNf4, IReadOnlyDictionary<string, long[]> shapes)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var value = full is not null && full.Contains(name) ? full.Read(name) : checkpoint.Read(name);
        bool nf4 = intoNf4 && IsDecoderLinear(name, shapes);
        if (!lora.TryGetValue(name, out var branch) && !nf4)
            return value.to_type(dtype).MoveToOuterDisposeScope();

        var w = value.to_type(ScalarType.Float32);
        if (nf4)
        {
            using var q = Nf4.Quantize(w);
            w = q.Dequantize(ScalarType.Float32);
        }
        if (branch.Part is not null)
        {
            var a = branch.Part.Weights.Read(branch.Module.AKey).to_type(ScalarType.Float32);    // (r, in)
            var b = branch.Part.Weights.Read(branch.Module.BKey).to_type(ScalarType.Float32);    // (out, r)
            w = LoraMerge.Merged(w, a, b, branch.Part.Config.Scaling, branch.Module.Module);
        }
        var result = w.to_type(dtype);
        if (!result.isfinite().all().item<bool>())
            throw new VlmTuneException($"'{name}': the merged weight overflows {dtype}; write a wider --dtype (bfloat16 or float32).");
        return result.MoveToOuterDisposeScope();
    }

    /// <summary>Greedy sharding in tensor order, as transformers' save_pretrained does; one file when everything fits.</summary>
    private static List<(string File, List<SafetensorsLayout> Entries)> PlanShards(List<SafetensorsLayout> layout, long maxBytes)
    {
        var groups = new List<List<SafetensorsLayout>> { new() };
        long size = 0;
        foreach (var e in layout)
        {
            if (groups[^1].Count > 0 && size + e.ByteLength > maxBytes) { groups.Add([]); size = 0; }
            groups[^1].Add(e);
            size += e.ByteLength;
        }
        if (groups.Count == 1) return [(CheckpointFolder.SingleFile, groups[0])];
        return groups.Select((g, i) => ($"model-{i + 1:D5}-of-{groups.Count:D5}.safetensors", g)).ToList();
    }

    private static void WriteIndex(string dir, List<(string File, List<SafetensorsLayout> Entries)> shards)
    {
        var map = new JsonObject();   // sorted by tensor name, as transformers writes it
        foreach (var (file, name) in shards.SelectMany(s => s.Entries.Select(e => (s.File, e.Name))).OrderBy(x => x.Name, StringComparer.Ordinal))
            map[name] = file;
        var index = new JsonObject
        {
            ["metadata"] = new JsonObject { ["total_size"] = shards.Sum(s => s.Entries.Sum(e => e.ByteLength)) },
            ["weight_map"] = map,
        };
        AtomicFile.WriteAllText(Path.Combine(dir, CheckpointFolder.IndexFile), index.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>
    /// The official config.json (the base's, or its hf config translated) with the template written explicitly (so no
    /// tool guesses it from the folder name), the dtype fields set to the output dtype, and the LoRA flags cleared (the
    /// weights hold no LoRA branch any more); for the hf layout that config translated by <see cref="HfConfig.ToHfConfig"/>.
    /// </summary>
    private static void WriteConfig(string baseDir, string outDir, InternVLConfig config, ScalarType? dtype, CheckpointLayout layout, int imageTokenId)
    {
        string path = Path.Combine(baseDir, "config.json");
        // InternVLConfig.Load has read this file already; duplicate keys are refused rather than thrown from JsonObject.
        JsonNode? parsed;
        try { parsed = JsonNode.Parse(File.ReadAllText(path), documentOptions: new JsonDocumentOptions { AllowDuplicateProperties = false }); }
        catch (JsonException e) { throw new CheckpointException($"{path}: invalid JSON: {e.Message}"); }
        var root = parsed as JsonObject ?? throw new CheckpointException($"{path}: expected a JSON object.");
        if (config.Layout == CheckpointLayout.Hf)
        {
            using var doc = JsonDocument.Parse(root.ToJsonString());
            root = HfConfig.ToOfficialConfig(doc.RootElement, baseDir, []);   // parsed once already: no problems left
        }
        root["template"] = config.Template;
        string? dtypeName = dtype is { } named ? TensorPlacement.ConfigName(named) : null;
        if (dtype is { } d)
        {
            foreach (var node in new[] { root, root["llm_config"] as JsonObject, root["vision_config"] as JsonObject })
            {
                if (node is null) continue;
                if (node.ContainsKey("torch_dtype") || node == root) node["torch_dtype"] = dtypeName;
                if (node.ContainsKey("use_bfloat16")) node["use_bfloat16"] = d == ScalarType.BFloat16;
            }
        }
        foreach (var flag in new[] { "use_llm_lora", "use_backbone_lora" })
            if (root.ContainsKey(flag)) root[flag] = 0;
        if (layout == CheckpointLayout.Hf) root = HfConfig.ToHfConfig(root, config, imageTokenId, dtypeName);
        AtomicFile.WriteAllText(Path.Combine(outDir, "config.json"), root.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>The chat_template the folder's tokenizer_config.json will hold (the updated text, else the base's); null if none.</summary>
    private static string? ChatTemplateOfFolder(string baseDir, string? updatedTokenizerConfig)
    {
        string? json = updatedTokenizerConfig;
        var basePath = Path.Combine(baseDir, ChatTemplateExport.TokenizerConfigFile);
        if (json is null && File.Exists(basePath)) json = File.ReadAllText(basePath);
        return json is not null && JsonNode.Parse(json)?["chat_template"] is JsonValue v && v.TryGetValue<string>(out var t) ? t : null;
    }

    /// <summary>
    /// The base tokenizer_config.json with the template's <c>chat_template</c> (LMDeploy and vLLM read only that one),
    /// or null to copy it unchanged: it already has it, or there is no file or no exportable template.
    /// </summary>
    private static string? TokenizerConfigWithChatTemplate(string baseDir, InternVLConfig config, Action<string> log, bool hfLayout)
    {
        string path = Path.Combine(baseDir, ChatTemplateExport.TokenizerConfigFile);
        if (!File.Exists(path)) return null;
        if (!ConversationTemplate.TryGet(config.Template, out var template) || template.JinjaChatTemplate is null)
        {
            log($"note: no chat template is known for the conversation template '{config.Template}'; {ChatTemplateExport.TokenizerConfigFile} is copied unchanged");
            return null;
        }
        var baseConfig = JsonNode.Parse(File.ReadAllText(Path.Combine(baseDir, "config.json")));
        var systemMessage = baseConfig?["system_message"] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;
        var updated = ChatTemplateExport.WithChatTemplate(File.ReadAllText(path), template, systemMessage, path, hfLayout);
        if (updated is not null) log($"{ChatTemplateExport.TokenizerConfigFile}: chat_template set to the '{template.Name}' prompt format");
        if (!hfLayout && File.Exists(Path.Combine(baseDir, ChatTemplateExport.JinjaFile)))
            log("note: the base's chat_template.jinja is copied unchanged; recent transformers prefer it to tokenizer_config.json's chat_template");
        return updated;
    }

    /// <summary>
    /// Tokenizer, generation and processor files and every *.py remote-code file at the top of the base folder; for the
    /// hf layout, <see cref="HfCopiedFilePatterns"/>.
    /// </summary>
    public static IReadOnlyList<string> FilesToCopy(string baseDir, CheckpointLayout layout = CheckpointLayout.Official) =>
        (layout == CheckpointLayout.Hf ? HfCopiedFilePatterns : CopiedFilePatterns)
            .SelectMany(p => Directory.EnumerateFiles(baseDir, p, SearchOption.TopDirectoryOnly))
            .Where(f => !f.EndsWith(".safetensors", StringComparison.Ordinal) && Path.GetFileName(f) != "config.json")
            .Distinct().OrderBy(f => f, StringComparer.Ordinal).ToList();

    /// <summary>Copies the bytes only: the merged folder is the user's own, not read-only like a cache or a fixture.</summary>
    private static void CopyContent(string source, string destination)
    {
        using var from = File.OpenRead(source);
        using var to = new FileStream(destination, FileMode.CreateNew, FileAccess.Write);
        from.CopyTo(to);
    }

    /// <summary>Moves the finished temporary folder to <paramref name="outDir"/>, replacing an existing (empty or forced) one.</summary>
    private static void Publish(string temp, string outDir)
    {
        if (!Directory.Exists(outDir)) { Directory.Move(temp, outDir); return; }
        string old = OwnedTemporary.Name(Path.Combine(Path.GetDirectoryName(outDir)!, $".{Path.GetFileName(outDir)}{OldMarker}"));
        Directory.Move(outDir, old);
        try { Directory.Move(temp, outDir); }
        catch
        {
            Directory.Move(old, outDir);
            throw;
        }
        TryDelete(old);
    }

    private static void TryDelete(string dir)
    {
        try { if (Directory.Exists(dir)) Directory.Delete(dir, recursive: true); }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
    }

    public static string FormatBytes(long bytes) => bytes switch
    {
        >= 1L << 30 => $"{bytes / (double)(1L << 30):F2} GiB",
        >= 1L << 20 => $"{bytes / (double)(1L << 20):F1} MiB",
        >= 1L << 10 => $"{bytes / 1024.0:F1} KiB",
        _ => $"{bytes} B",
    };

    /// <summary>Parses a shard size as transformers writes it: "5GB", "500MB", "200KB" (powers of 1000) or a byte count.</summary>
    public static long ParseSize(string text)
    {
        string s = text.Trim().ToUpperInvariant();
        (string Suffix, long Factor)[] units = [("GIB", 1L << 30), ("MIB", 1L << 20), ("KIB", 1L << 10), ("GB", 1_000_000_000), ("MB", 1_000_000), ("KB", 1_000), ("B", 1)];
        foreach (var (suffix, factor) in units)
            if (s.EndsWith(suffix, StringComparison.Ordinal) && double.TryParse(s[..^suffix.Length], System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out var v) && v > 0)
                return (long)(v * factor);
        if (long.TryParse(s, out var n) && n > 0) return n;
        throw new VlmTuneException($"--max-shard-size '{text}' is not a size (e.g. 5GB, 500MB, 200KB or a byte count).");
    }
}
