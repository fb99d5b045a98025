using VlmTune.Models;

namespace VlmTune.Checkpoints;

/// <summary>A model folder as a ready <see cref="InternVLChatModel"/>: Models defines the modules, this folder reads the files into them.</summary>
public static class InternVLModelLoader
{
    /// <summary>
    /// Builds the model that <c>config.json</c> describes and loads its weights strictly from the folder's safetensors,
    /// in the official or the Hugging Face layout.
    /// </summary>
    public static InternVLChatModel Load(string modelDir, ModelOptions options)
    {
        if (!Directory.Exists(modelDir)) throw new VlmTuneException($"{modelDir}: model folder not found.");
        var config = InternVLConfig.Load(modelDir);
        using var checkpoint = ModelWeights.Open(modelDir, config);   // official names, either layout
        var model = new InternVLChatModel(config, options);
        try
        {
            WeightLoader.LoadStrict(model, checkpoint);
        }
        catch
        {
            model.Dispose();
            throw;
        }
        model.eval();
        return model;
    }
}
