namespace VlmTune.Distributed;

/// <summary>A failure of the distributed job: bad launcher variables, a rank that is missing or died, NCCL errors.</summary>
public sealed class DistributedException(string message, Exception? inner = null) : VlmTuneException(message, inner);
