namespace VlmTune.Hub;

/// <summary>Which model hub a repository lives on; each has its own API shapes and defaults.</summary>
public enum HubSource
{
    /// <summary>Hugging Face Hub (or a mirror of its API such as the one named by HF_ENDPOINT).</summary>
    HuggingFace,

    /// <summary>ModelScope (modelscope.cn or the domain named by MODELSCOPE_DOMAIN).</summary>
    ModelScope,
}

public static class HubSourceNames
{
    /// <summary>Parses the CLI spelling: <c>hf</c>/<c>huggingface</c> or <c>modelscope</c>/<c>ms</c>.</summary>
    public static HubSource Parse(string value) => value.Trim().ToLowerInvariant() switch
    {
        "hf" or "huggingface" or "hugging-face" => HubSource.HuggingFace,
        "modelscope" or "ms" => HubSource.ModelScope,
        _ => throw new VlmTuneException($"--source '{value}' is not a known hub; use 'hf' or 'modelscope'."),
    };

    public static string Name(this HubSource source) => source == HubSource.HuggingFace ? "hf" : "modelscope";
}
