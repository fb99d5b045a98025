namespace VlmTune.Tests.Support;

/// <summary>
/// Tests whose results depend on TorchSharp's global random generator (dropout masks seeded with torch.manual_seed, as
/// in resume-equality checks) run in this collection, alone: another test drawing from the same generator in parallel
/// would change their masks.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class GlobalTorchRng
{
    public const string Name = "Global torch RNG";
}
