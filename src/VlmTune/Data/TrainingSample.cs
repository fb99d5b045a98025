using VlmTune.Text;

namespace VlmTune.Data;

/// <summary>
/// Where a sample came from: the file, its 1-based line (of the record's first character in a JSON array) and its
/// 0-based record index in that file.
/// </summary>
public sealed record SampleSource(string File, long Line, long Index)
{
    public override string ToString() => $"{File}:{Line} (record {Index})";
}

/// <summary>
/// One training sample in InternVL's chat form (turns from <c>system</c>, <c>human</c>, <c>gpt</c>), whatever format it was read from. <see cref="Images"/> are full
/// paths, already resolved against (and checked to stay inside) the image root; their <c>&lt;image&gt;</c>
/// placeholders appear in <see cref="Conversations"/> in the same order. Text-only samples have no images.
/// </summary>
public sealed record TrainingSample(
    string Id,
    IReadOnlyList<string> Images,
    IReadOnlyList<ConversationTurn> Conversations,
    SampleSource Source,
    string? Dataset = null,
    int? MaxDynamicPatch = null)
{
    /// <summary>How many <c>&lt;image&gt;</c> placeholders the conversation holds.</summary>
    public int PlaceholderCount() => Conversations.Sum(turn => ImagePlaceholders.Count(turn.Value));
}

/// <summary>What can be wrong with a record of training data (see docs/data.md).</summary>
public enum DataProblemKind
{
    /// <summary>Not valid JSON.</summary>
    BadJson,
    /// <summary>Valid JSON but not a sample: a field missing or of the wrong type, an unknown role.</summary>
    BadRecord,
    /// <summary>An image path that is absolute or leaves the image root (through .. or a symlink).</summary>
    PathEscapesRoot,
    /// <summary>Turns do not go (system?) human, gpt, human, gpt, ...</summary>
    RolesNotAlternating,
    /// <summary>The number of &lt;image&gt; placeholders differs from the number of images.</summary>
    PlaceholderMismatch,
    /// <summary>An image file that does not exist.</summary>
    ImageMissing,
    /// <summary>An image file that exists but cannot be decoded.</summary>
    ImageUndecodable,
    /// <summary>Text tokens plus image tokens exceed the maximum length.</summary>
    TooLong,
}

/// <summary>A problem with one record, located by file and line.</summary>
public sealed record DataProblem(DataProblemKind Kind, SampleSource Source, string Message)
{
    public override string ToString() => $"{Source.File}:{Source.Line} (record {Source.Index}): {Message}";
}

/// <summary>A record read from training data: a sample, or the problem that kept it from being one.</summary>
public readonly record struct DataEntry(TrainingSample? Sample, DataProblem? Problem)
{
    public static DataEntry Of(TrainingSample sample) => new(sample, null);
    public static DataEntry Of(DataProblem problem) => new(null, problem);
}

/// <summary>A record that is not a valid sample: thrown when training data is read strictly.</summary>
public sealed class DataFormatException(DataProblem problem) : VlmTuneException(problem.ToString())
{
    public DataProblem Problem { get; } = problem;
}
