using VlmTune.Checkpoints;
using VlmTune.Models;

namespace VlmTune.Training;

/// <summary>QLoRA's base model: the LLM's decoder linear weights in NF4; embeddings, norms and the output head untouched.</summary>
public static class Qlora
{
    /// <summary>
    /// Quantises every linear layer inside the decoder layers (wqkv, wo, w1, w2, w3) to NF4 with double quantisation,
    /// as transformers' load_in_4bit does (it keeps the output head in full precision). Returns how many were quantised.
    /// </summary>
    public static int QuantizeLanguageModel(InternLM2ForCausalLM llm, bool doubleQuant = true)
    {
        int count = 0;
        foreach (var (_, linear) in PeftAdapter.Linears(llm.model.layers))
        {
            Nf4.QuantizeLinear(linear, doubleQuant);
            count++;
        }
        return count;
    }
}
