namespace VlmTune.Hub;

/// <summary>A download failed in a way the user can act on: the message names the repo or file and what to do.</summary>
public class HubDownloadException(string message, Exception? inner = null) : VlmTuneException(message, inner);

/// <summary>A failure worth retrying (connection reset, timeout, 429/5xx); turned into a HubDownloadException when retries run out.</summary>
internal sealed class HubTransientException(string message, Exception? inner = null) : Exception(message, inner);
