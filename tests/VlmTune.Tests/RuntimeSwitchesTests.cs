using System.Collections;
using VlmTune.Diagnostics;
using VlmTune.Inference;
using VlmTune.Tests.Support;

namespace VlmTune.Tests;

/// <summary>The VLMTUNE_* switches: parsed in one place, refused with one line naming the variable, passed down.</summary>
public sealed class RuntimeSwitchesTests
{
    private static RuntimeSwitches Parse(params (string Name, string Value)[] vars) =>
        RuntimeSwitches.FromEnvironment(new Hashtable(vars.ToDictionary(v => v.Name, v => (object?)v.Value)));

    [Fact]
    public void NothingSetIsTheDefaults()
    {
        Assert.Equal(RuntimeSwitches.Defaults, Parse());
        Assert.Equal(RuntimeSwitches.Defaults, Parse((RuntimeSwitches.FusedDecodeVariable, "  "), (RuntimeSwitches.TestPauseVariable, "")));   // empty: unset
        var d = RuntimeSwitches.Defaults;
        Assert.True(d.FusedDecode && d.Nf4Kernel && d.FusedAdamW && d.FusedTuning.TensorCores);
        Assert.False(d.GpuIsolated);
        Assert.Null(d.CudnnAttention);
        Assert.Null(d.FusedTuning.GemvUnroll);
        Assert.Equal(FusedKernels.None, d.FusedTuning.Skip);
        Assert.False(d.FusedTuning.Graphs);   // CUDA graphs stay off until measured
        Assert.Null(d.MemoryTraceIteration);
        Assert.Null(d.TestFault);
        Assert.Null(d.TestPause);
    }

    [Theory]
    [InlineData("0", false)]
    [InlineData("false", false)]
    [InlineData(" Off ", false)]
    [InlineData("no", false)]
    [InlineData("1", true)]
    [InlineData("TRUE", true)]
    [InlineData("on", true)]
    [InlineData("yes", true)]
    public void OnOffSwitchesAcceptTheUsualSpellings(string value, bool on)
    {
        Assert.Equal(on, Parse((RuntimeSwitches.FusedDecodeVariable, value)).FusedDecode);
        Assert.Equal(on, Parse((RuntimeSwitches.FusedMmaVariable, value)).FusedTuning.TensorCores);
        Assert.Equal(on, Parse((RuntimeSwitches.Nf4KernelVariable, value)).Nf4Kernel);
        Assert.Equal(on, Parse((RuntimeSwitches.FusedAdamWVariable, value)).FusedAdamW);
        Assert.Equal(on, Parse((RuntimeSwitches.GpuIsolatedVariable, value)).GpuIsolated);
        Assert.Equal(on, Parse((RuntimeSwitches.CudnnAttentionVariable, value)).CudnnAttention);
        Assert.Equal(on, Parse((RuntimeSwitches.CudaGraphsVariable, value)).FusedTuning.Graphs);
    }

    [Fact]
    public void ValuedSwitchesParse()
    {
        var s = Parse(
            (RuntimeSwitches.FusedGemvUnrollVariable, "2"), (RuntimeSwitches.FusedMmaUnrollVariable, "8"),
            (RuntimeSwitches.FusedSkipVariable, "gemv, Rope"), (RuntimeSwitches.MemoryTraceVariable, "12"),
            (RuntimeSwitches.TestFaultVariable, "hang:1:3"), (RuntimeSwitches.TestPauseVariable, "merge-shard"));
        Assert.Equal(new FusedDecodeTuning { GemvUnroll = 2, MmaUnroll = 8, Skip = FusedKernels.Gemv | FusedKernels.Rope }, s.FusedTuning);
        Assert.Equal(12, s.MemoryTraceIteration);
        Assert.Equal(new InjectedFault(InjectedFaultKind.Hang, 1, 3), s.TestFault);
        Assert.Equal("merge-shard", s.TestPause);
        Assert.Equal(FusedKernels.All, Parse((RuntimeSwitches.FusedSkipVariable, "all")).FusedTuning.Skip);   // the embedding too
        Assert.Equal(new InjectedFault(InjectedFaultKind.Exit, 0, 6), Parse((RuntimeSwitches.TestFaultVariable, "exit:0:6")).TestFault);
    }

    [Theory]
    [InlineData(RuntimeSwitches.FusedDecodeVariable, "maybe", "1, true, on, yes / 0, false, off, no")]
    [InlineData(RuntimeSwitches.FusedMmaVariable, "2", "1, true, on, yes / 0, false, off, no")]
    [InlineData(RuntimeSwitches.Nf4KernelVariable, "disabled", "1, true, on, yes / 0, false, off, no")]
    [InlineData(RuntimeSwitches.FusedAdamWVariable, "fast", "1, true, on, yes / 0, false, off, no")]
    [InlineData(RuntimeSwitches.GpuIsolatedVariable, "y", "1, true, on, yes / 0, false, off, no")]
    [InlineData(RuntimeSwitches.CudnnAttentionVariable, "auto", "1, true, on, yes / 0, false, off, no")]
    [InlineData(RuntimeSwitches.FusedGemvUnrollVariable, "0", "an integer ≥ 1")]
    [InlineData(RuntimeSwitches.FusedMmaUnrollVariable, "four", "an integer ≥ 1")]
    [InlineData(RuntimeSwitches.FusedMmaUnrollVariable, "99999999999", "an integer ≥ 1")]
    [InlineData(RuntimeSwitches.FusedSkipVariable, "gemv,softmax", "a comma-separated list of gemv, attention, norm, rope, all")]
    [InlineData(RuntimeSwitches.MemoryTraceVariable, "-1", "an integer ≥ 1")]
    [InlineData(RuntimeSwitches.TestFaultVariable, "exit:1", "exit:RANK:ITERATION or hang:RANK:ITERATION")]
    [InlineData(RuntimeSwitches.TestFaultVariable, "crash:1:3", "exit:RANK:ITERATION or hang:RANK:ITERATION")]
    [InlineData(RuntimeSwitches.TestPauseVariable, "chekpoint", "checkpoint, merge-shard, convert-record")]
    public void BadValueIsOneLineNamingTheVariableAndWhatItAccepts(string name, string value, string accepted)
    {
        var e = Assert.Throws<VlmTuneException>(() => Parse((name, value)));
        Assert.StartsWith($"{name}='{value}'", e.Message);
        Assert.Contains($"(accepted: {accepted}", e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void EveryBadValueIsReportedAtOnce()
    {
        var e = Assert.Throws<VlmTuneException>(() => Parse((RuntimeSwitches.FusedDecodeVariable, "maybe"), (RuntimeSwitches.TestPauseVariable, "nowhere")));
        Assert.Contains(RuntimeSwitches.FusedDecodeVariable, e.Message);
        Assert.Contains(RuntimeSwitches.TestPauseVariable, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void EngineOptionsTakeTheDecodeSwitches()
    {
        var switches = Parse((RuntimeSwitches.FusedDecodeVariable, "0"), (RuntimeSwitches.FusedMmaVariable, "0"));
        var options = new EngineOptions { MaxBatch = 3 }.With(switches);
        Assert.False(options.FusedDecode);
        Assert.False(options.FusedTuning.TensorCores);
        Assert.Equal(3, options.MaxBatch);
        Assert.True(new EngineOptions().With(RuntimeSwitches.Defaults).FusedDecode);
    }

    [Fact]
    public void AFaultForAnotherRankOrIterationReturns()
    {
        var fault = new InjectedFault(InjectedFaultKind.Exit, 1, 3);
        fault.At(0, 3);   // would end this test process if it fired
        fault.At(1, 2);
    }

    /// <summary>The CLI reads the switches at start-up: a bad one stops any command at once, one line, no stack trace.</summary>
    [Fact]
    public async Task TheCliRefusesABadSwitchBeforeDoingAnything()
    {
        var (code, stdout, stderr) = await CliProcess.RunAsync(["chat", "--model", "/nonexistent/model", "--prompt", "hi"],
            new Dictionary<string, string> { [RuntimeSwitches.FusedDecodeVariable] = "maybe" });
        Assert.Equal(1, code);
        Assert.Equal($"error: {RuntimeSwitches.FusedDecodeVariable}='maybe' is not a switch value (accepted: 1, true, on, yes / 0, false, off, no).", stderr.Trim());
        Assert.Empty(stdout);
    }
}
