using TorchSharp.Modules;
using VlmTune.Checkpoints;
using VlmTune.Models;
using VlmTune.Quantization;
using static TorchSharp.torch;

namespace VlmTune.Training;

/// <summary>What <see cref="ModelPreparation.Apply"/> made of a model: the tensors to train and the adapters attached.</summary>
public sealed record PreparedModel(
    IReadOnlyList<(string Name, Parameter Param)> Trainable,
    PeftAdapterConfig? LlmLora,
    PeftAdapterConfig? VisionLora,
    bool VisionTrainable,
    bool ProjectorTrainable,
    IReadOnlyList<(string Name, Nf4Tensor Weight)> QuantizedLlmWeights)
{
    public long TrainableCount => Trainable.Sum(t => t.Param.numel());

    /// <summary>
    /// The modules' modes while training: the model in eval mode except the LLM (LoRA dropout) and a trained ViT.
    /// Evaluation switches everything to eval mode and comes back here.
    /// </summary>
    public void RestoreTrainingModes(InternVLChatModel model)
    {
        model.eval();
        model.language_model.train();
        if (VisionTrainable) model.vision_model.train();
    }
}

/// <summary>
/// The training mode applied to a loaded model, for the trainer and the training benchmark alike: everything frozen,
/// then NF4 quantisation (qlora, quantize_vision), LoRA branches on the targets, the parts the config trains unfrozen.
/// </summary>
public static class ModelPreparation
{
    /// <summary>
    /// LoRA weights are fp32 (PEFT), computed autocast in bf16 runs; with the optimizer offloaded they are held in the
    /// model's dtype on the GPU and their fp32 masters in host memory.
    /// </summary>
    public static ScalarType LoraDType(TrainConfig config, ScalarType dtype) => config.OptimizerOffload ? dtype : ScalarType.Float32;

    /// <param name="nf4CudaKernel">Dequantise NF4 weights with the CUDA kernel (VLMTUNE_NF4_KERNEL).</param>
    public static PreparedModel Apply(InternVLChatModel model, TrainConfig config, ScalarType dtype, Action<string> info, bool nf4CudaKernel = true)
    {
        foreach (var p in model.parameters()) p.requires_grad_(false);
        IReadOnlyList<(string Name, Nf4Tensor Weight)> quantized = [];
        if (config.Mode == TrainMode.Qlora)
        {
            quantized = Qlora.QuantizeLanguageModel(model.language_model, cudaKernel: nf4CudaKernel);
            info($"qlora: {quantized.Count} LLM linear layers stored as NF4 (block 64, double-quantised absmax)");
        }
        if (config.QuantizeVision)
        {
            int n = Qlora.QuantizeVisionModel(model.vision_model, cudaKernel: nf4CudaKernel).Count;
            info($"quantize_vision: {n} ViT linear layers stored as NF4");
        }
        var loraDType = LoraDType(config, dtype);
        PeftAdapterConfig? llmLora = null, visionLora = null;
        if (config.UsesLora)
        {
            var llm = model.language_model;
            List<string> targets = [.. config.LoraTargets ?? llm.DefaultLoraTargets];
            if (llm.OutputHeadName is null && config.LoraTargets is { } asked && asked.Any(t => t is "lm_head" or "output"))
                throw new VlmTuneException($"{config.Model}: 'lora_targets' names the output head, but this model ties it to the token embeddings (tie_word_embeddings); leave it out.");
            llmLora = new PeftAdapterConfig
            {
                R = config.LoraR, LoraAlpha = config.LoraAlpha, LoraDropout = config.LoraDropout, TargetModules = targets,
                BaseModelNameOrPath = Path.GetFullPath(config.Model),
            };
            var names = PeftAdapter.Attach(llm, llmLora, loraDType);
            info($"lora: r={config.LoraR} alpha={config.LoraAlpha} dropout={config.LoraDropout} on {names.Count} LLM layers ({string.Join(", ", targets)})");
        }
        if (config.VisionLoraR > 0)
        {
            visionLora = new PeftAdapterConfig
            {
                R = config.VisionLoraR, LoraAlpha = config.VisionLoraAlpha, LoraDropout = config.LoraDropout, TargetModules = config.VisionLoraTargets,
                BaseModelNameOrPath = Path.GetFullPath(config.Model), TaskType = null,
            };
            PeftAdapter.Attach(model.vision_model, visionLora, loraDType);
        }
        if (!config.FreezeVision) foreach (var p in model.vision_model.parameters()) p.requires_grad_(true);
        if (!config.FreezeProjector) foreach (var p in model.mlp1.parameters()) p.requires_grad_(true);
        if (!config.LlmFrozen) foreach (var p in model.language_model.parameters()) p.requires_grad_(true);
        foreach (var (name, p) in model.named_parameters())
            if (name.Contains(".lora_")) p.requires_grad_(true);

        // bf16 training computes LoRA branches in bf16 with fp32 weights, as XTuner's DeepSpeed bf16 does.
        if (dtype != ScalarType.Float32)
            foreach (var linear in model.modules().OfType<VlmTune.Models.Linear>().Where(l => l.HasLora)) linear.LoraAutocast = true;

        List<(string Name, Parameter Param)> trainable = [.. model.named_parameters().Where(p => p.parameter.requires_grad).Select(p => (p.name, p.parameter))];
        if (trainable.Count == 0) throw new VlmTuneException($"{config.Source}: the config trains nothing (every part is frozen).");
        var prepared = new PreparedModel(trainable, llmLora, visionLora, VisionTrainable: config.TrainsVision,
            ProjectorTrainable: !config.FreezeProjector, quantized);
        info($"trainable parameters: {prepared.TrainableCount:N0} in {trainable.Count} tensors ({string.Join(", ", trainable.Select(t => t.Name.Split('.')[0]).Distinct())})");

        prepared.RestoreTrainingModes(model);
        return prepared;
    }
}
