namespace VlmTune;

/// <summary>Base of every error VlmTune reports to users: the message names the file, field or value at fault.</summary>
public class VlmTuneException(string message, Exception? inner = null) : Exception(message, inner);
