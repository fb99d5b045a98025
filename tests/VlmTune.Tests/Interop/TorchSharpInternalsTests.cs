using System.Reflection;
using TorchSharp;
using VlmTune.Interop;

namespace VlmTune.Tests.Interop;

/// <summary>The TorchSharp internals VlmTune reads exist on the referenced TorchSharp; any other version is refused.</summary>
public sealed class TorchSharpInternalsTests
{
    /// <summary>Fails when a TorchSharp upgrade renames or retypes the private members (or changes major.minor).</summary>
    [Fact]
    public void TheReflectionTargetsAreFoundOnTheReferencedTorchSharp()
    {
        Assert.Null(TorchSharpInternals.Problem);
        Assert.Equal((0, 107), (TorchSharpInternals.Loaded.Major, TorchSharpInternals.Loaded.Minor));
        Assert.Equal(TorchSharpInternals.WrittenFor, new Version(TorchSharpInternals.Loaded.Major, TorchSharpInternals.Loaded.Minor));
    }

    [Fact]
    public void AnotherVersionOrAMissingMemberIsOneLineSayingWhich()
    {
        var node = typeof(torch.autograd.AutogradContext).GetField("_node", BindingFlags.NonPublic | BindingFlags.Instance)!;
        var cache = typeof(torch).Assembly.GetType(node.FieldType.FullName + "`1")!.GetField("_outputCache", BindingFlags.NonPublic | BindingFlags.Instance)!;
        Assert.Null(TorchSharpInternals.Diagnose(new Version(0, 107, 3), node, cache));   // patch releases keep the members
        Assert.Equal("TorchSharp 0.108.0 is not the 0.107.x whose internals VlmTune reads", TorchSharpInternals.Diagnose(new Version(0, 108, 0), node, cache));
        Assert.Equal("TorchSharp 0.107.0 has no AutogradContext._node", TorchSharpInternals.Diagnose(new Version(0, 107, 0), null, null));
        Assert.Equal("TorchSharp 0.107.0 has no Node<T>._outputCache", TorchSharpInternals.Diagnose(new Version(0, 107, 0), node, null));
        var wrongType = typeof(Holder).GetField(nameof(Holder.NotAList))!;
        Assert.Contains("not a List<Tensor>", TorchSharpInternals.Diagnose(new Version(0, 107, 0), node, wrongType));
    }

    private sealed class Holder { public int NotAList = 0; }
}
