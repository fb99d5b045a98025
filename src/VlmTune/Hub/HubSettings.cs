namespace VlmTune.Hub;

/// <summary><see cref="HubDownloadOptions"/> with every default resolved from the environment, validated up front.</summary>
internal sealed record HubSettings(
    HubSource Source, string RepoId, string Revision, bool RevisionGiven, string Endpoint, string? Token, bool Offline,
    string LocalDir, HubDownloadOptions Options)
{
    public const string HfDefaultEndpoint = "https://huggingface.co";
    public const string ModelScopeDefaultEndpoint = "https://www.modelscope.cn";

    /// <summary>The environment variable a user sets for a token, named in error messages.</summary>
    public string TokenVariable => Source == HubSource.HuggingFace ? "HF_TOKEN" : "MODELSCOPE_API_TOKEN";

    public static HubSettings Resolve(HubDownloadOptions options, Func<string, string?> env)
    {
        var problems = new List<string>();
        var repoId = options.RepoId?.Trim() ?? "";
        var parts = repoId.Split('/');
        if (parts.Length is < 1 or > 2 || parts.Any(p => p.Length == 0 || p is "." or ".." || p.Any(char.IsWhiteSpace)))
            problems.Add($"repo id '{options.RepoId}' is not of the form owner/name");
        if (string.IsNullOrWhiteSpace(options.LocalDir)) problems.Add("--local-dir is required");
        if (options.MaxParallelFiles < 1) problems.Add($"parallel files must be at least 1 (got {options.MaxParallelFiles})");
        if (options.MaxRetries < 0) problems.Add($"retries must be 0 or more (got {options.MaxRetries})");

        var hf = options.Source == HubSource.HuggingFace;
        var endpoint = NonEmpty(options.Endpoint)
                       ?? (hf ? NonEmpty(env("HF_ENDPOINT")) : DomainToUrl(NonEmpty(env("MODELSCOPE_DOMAIN"))))
                       ?? (hf ? HfDefaultEndpoint : ModelScopeDefaultEndpoint);
        endpoint = endpoint.TrimEnd('/');
        if (!Uri.TryCreate(endpoint, UriKind.Absolute, out var uri) || uri.Scheme is not ("http" or "https"))
            problems.Add($"endpoint '{endpoint}' is not an http(s) URL");

        if (problems.Count > 0) throw new HubDownloadException("Invalid download request: " + string.Join("; ", problems) + ".");

        var revision = NonEmpty(options.Revision);
        return new HubSettings(
            options.Source, repoId, revision ?? (hf ? "main" : "master"), revision is not null, endpoint,
            NonEmpty(options.Token) ?? NonEmpty(env(hf ? "HF_TOKEN" : "MODELSCOPE_API_TOKEN")),
            options.Offline ?? IsTrue(env("HF_HUB_OFFLINE")),
            Path.GetFullPath(options.LocalDir), options);
    }

    /// <summary>huggingface_hub's truthy spellings of a boolean environment variable.</summary>
    public static bool IsTrue(string? value) =>
        value?.Trim().ToUpperInvariant() is "1" or "ON" or "YES" or "TRUE";

    private static string? NonEmpty(string? s) => string.IsNullOrWhiteSpace(s) ? null : s.Trim();

    // MODELSCOPE_DOMAIN names a host (modelscope's own convention); an explicit scheme is kept.
    private static string? DomainToUrl(string? domain) =>
        domain is null ? null : domain.Contains("://", StringComparison.Ordinal) ? domain : "https://" + domain;
}
