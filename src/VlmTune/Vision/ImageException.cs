namespace VlmTune.Vision;

/// <summary>An image that cannot be used: unreadable, corrupt, truncated, of an unknown format or beyond the limits.</summary>
public class ImageException(string message, Exception? inner = null) : VlmTuneException(message, inner);
