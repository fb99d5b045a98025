using VlmTune.Models;

namespace VlmTune.Quantization;

/// <summary>
/// QLoRA's base model: the LLM's decoder linear weights in NF4; embeddings, norms and the output head untouched.
/// Optionally the frozen ViT's linears too (XTuner's quantization_vit).
/// </summary>
public static class Qlora
{
    /// <summary>
    /// Quantises every linear layer inside the decoder layers (attention and MLP projections) to NF4 with double
    /// quantisation, as transformers' load_in_4bit does (it keeps the output head in full precision). Returns the NF4
    /// weights by layer name. <paramref name="cudaKernel"/>: <see cref="RuntimeSwitches.Nf4Kernel"/>.
    /// </summary>
    public static IReadOnlyList<(string Name, Nf4Tensor Weight)> QuantizeLanguageModel(CausalLanguageModel llm, bool doubleQuant = true, bool cudaKernel = true) =>
        Linear.AllIn(llm.LayerStack).Select(x => (x.Item1, Nf4.QuantizeLinear(x.Item2, doubleQuant, cudaKernel))).ToList();

    /// <summary>
    /// Quantises every linear layer of the vision encoder (attention qkv/proj, MLP fc1/fc2) to NF4, as XTuner's
    /// quantization_vit does; the patch embedding (a convolution) and norms stay. Only for a frozen ViT.
    /// </summary>
    public static IReadOnlyList<(string Name, Nf4Tensor Weight)> QuantizeVisionModel(InternVisionModel vit, bool doubleQuant = true, bool cudaKernel = true) =>
        Linear.AllIn(vit.encoder).Select(x => (x.Item1, Nf4.QuantizeLinear(x.Item2, doubleQuant, cudaKernel))).ToList();
}
