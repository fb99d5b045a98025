using VlmTune.Cuda;
using VlmTune.Inference;
using VlmTune.Models;

namespace VlmTune.Tests.Cuda;

public class CudaLibraryTests
{
    [Fact]
    public void PytorchWheelLayoutsAreSearchedForNvrtc()
    {
        var dirs = Nvrtc.DefaultSearchDirectories("/opt/cuda/lib64:/opt/py/site-packages/torch/lib");
        Assert.Equal("/opt/cuda/lib64", dirs[0]);
        Assert.Contains("/opt/py/site-packages/torch/lib", dirs);
        Assert.Contains("/opt/py/site-packages/nvidia/cuda_nvrtc/lib", dirs);   // cu12 wheels
        Assert.Contains("/opt/py/site-packages/nvidia/cu13/lib", dirs);         // cu13 wheels
        Assert.Contains("/usr/local/cuda/lib64", dirs);
    }

    [Fact]
    public void NewestLibraryVersionIsTriedFirstAndBuiltinsAreNotNvrtc()
    {
        var dir = Directory.CreateTempSubdirectory("vlmtune-nvrtc-").FullName;
        try
        {
            foreach (var name in new[] { "libnvrtc.so", "libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so.13.0.88", "libnvrtc-builtins.so.13.0", "libnvrtc_static.a" })
                File.WriteAllText(Path.Combine(dir, name), "");
            var found = NativeSearch.Versions(dir, "libnvrtc.so").Select(Path.GetFileName).ToList();
            Assert.Equal(["libnvrtc.so.13.0.88", "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"], found);
            Assert.Empty(NativeSearch.Versions(Path.Combine(dir, "absent"), "libnvrtc.so"));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void MissingNvrtcIsAClearErrorListingWhereItLooked()
    {
        var empty = Directory.CreateTempSubdirectory("vlmtune-nvrtc-").FullName;
        var broken = Directory.CreateTempSubdirectory("vlmtune-nvrtc-").FullName;
        try
        {
            File.WriteAllText(Path.Combine(broken, "libnvrtc.so.13"), "not a library");
            var e = Assert.Throws<CudaException>(() => Nvrtc.Load([empty, broken], trySystemLoader: false));
            Assert.Contains(Path.Combine(empty, "libnvrtc.so*"), e.Message);
            Assert.Contains(Path.Combine(broken, "libnvrtc.so.13"), e.Message);   // present but not loadable: tried, listed
            Assert.Contains("LD_LIBRARY_PATH", e.Message);
            Assert.Contains(RuntimeSwitches.FusedDecodeVariable + "=0", e.Message);
            Assert.IsAssignableFrom<VlmTuneException>(e);
        }
        finally { Directory.Delete(empty, true); Directory.Delete(broken, true); }
    }

    [Fact]
    public void MissingDriverIsAClearErrorListingWhereItLooked()
    {
        var empty = Directory.CreateTempSubdirectory("vlmtune-cuda-").FullName;
        try
        {
            var e = Assert.Throws<CudaException>(() => CudaDriver.Load([empty], trySystemLoader: false));
            Assert.Contains(Path.Combine(empty, "libcuda.so.1"), e.Message);
            Assert.Contains("NVIDIA driver", e.Message);
        }
        finally { Directory.Delete(empty, true); }
    }

    [Fact]
    public void DriverSearchIncludesContainerMounts()
    {
        var dirs = CudaDriver.DefaultSearchDirectories("/x/lib");
        Assert.Equal("/x/lib", dirs[0]);
        Assert.Contains("/usr/local/nvidia/lib64", dirs);
    }

    [Fact]
    public void DecodeKernelSourceIsEmbeddedWithEveryKernelTheHostLaunches()
    {
        var source = KernelSources.Read("decode.cu");
        foreach (var kernel in new[]
        {
            "embed_rows", "rms_norm", "gemv_plain", "gemv_bias", "gemv_residual", "gemv_gated", "mma_plain", "mma_bias", "mma_residual", "mma_gated",
            "set_step", "rope_append", "attention_split", "attention_combine", "argmax_rows",
        })
            Assert.Contains($"__global__ void {kernel}(", source.Replace("__launch_bounds__(256) ", "").Replace("__launch_bounds__(CHUNK) ", "").Replace("__launch_bounds__(MMA_WARPS * 32) ", ""));
        // Every compile-time define the host passes is one the source reads.
        foreach (var define in FusedDecodePlan.Defines(TinyConfig(), 8).Keys) Assert.Contains(define, source);
    }

    [Fact]
    public void Nf4KernelSourceIsEmbeddedWithBothOutputTypes()
    {
        var source = KernelSources.Read("nf4.cu");
        Assert.Contains("__global__ void nf4_dequantize_bf16(", source);
        Assert.Contains("__global__ void nf4_dequantize_f32(", source);
        // Its NF4 table is the one quantisation uses, value for value.
        int open = source.IndexOf("NF4[16] = {", StringComparison.Ordinal);
        var table = source[(open + 11)..source.IndexOf("};", open, StringComparison.Ordinal)]
            .Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .Select(v => float.Parse(v.TrimEnd('f'), System.Globalization.CultureInfo.InvariantCulture)).ToArray();
        Assert.Equal(VlmTune.Quantization.Nf4.Values, table);
    }

    [NvrtcFact]
    public void Nf4KernelCompiles()
    {
        var cubin = Nvrtc.Load().CompileCubin(KernelSources.Read("nf4.cu"), "nf4.cu", (8, 0), []);
        Assert.True(cubin.Length > 1000);
    }

    [NvrtcFact]
    public void AdamWKernelsCompile()
    {
        var cubin = Nvrtc.Load().CompileCubin(KernelSources.Read("adamw.cu"), "adamw.cu", (9, 0), ["-DCHUNK=32768"]);
        Assert.True(cubin.Length > 1000);
    }

    [Fact]
    public void MissingKernelSourceIsACudaException()
    {
        var e = Assert.Throws<CudaException>(() => KernelSources.Read("absent.cu"));
        Assert.Contains("absent.cu", e.Message);
    }

    /// <summary>
    /// Compiles every batch variant of the decode kernels where NVRTC is installed (skipped elsewhere): a syntax or
    /// template error in decode.cu fails here, not on first use on a GPU machine. Compiling needs no GPU.
    /// </summary>
    [NvrtcFact]
    public void DecodeKernelsCompileForEveryBatchBucket()
    {
        var nvrtc = Nvrtc.Load();
        var source = KernelSources.Read("decode.cu");
        foreach (var config in new[]
        {
            TinyConfig(), TinyConfig() with { HiddenSize = 2048, NumAttentionHeads = 16, NumKeyValueHeads = 8, IntermediateSize = 8192 },
            // Phi-3-mini's head_dim 96 (12 16-byte slices: the attention kernel's padding lanes), 1 and 4 query heads per KV head.
            TinyConfig() with { Architecture = LlmArchitectures.Phi3, HiddenSize = 3072, NumAttentionHeads = 32, NumKeyValueHeads = 32, IntermediateSize = 8192 },
            TinyConfig() with { Architecture = LlmArchitectures.Phi3, HiddenSize = 3072, NumAttentionHeads = 32, NumKeyValueHeads = 8, IntermediateSize = 8192 },
        })
            foreach (int bucket in new[] { 1, 2, 4, 8, 16, 32 })
            {
                var options = FusedDecodePlan.Defines(config, bucket).Select(d => $"-D{d.Key}={d.Value}");
                var cubin = nvrtc.CompileCubin(source, "decode.cu", (8, 0), options);
                Assert.True(cubin.Length > 1000);
            }
    }

    [NvrtcFact]
    public void CompileErrorsCarryNvrtcsLog()
    {
        var e = Assert.Throws<CudaException>(() => Nvrtc.Load().CompileCubin("extern \"C\" __global__ void k() { undefined_thing(); }", "bad.cu", (8, 0), []));
        Assert.Contains("bad.cu", e.Message);
        Assert.Contains("undefined_thing", e.Message);
    }

    internal static LlmConfig TinyConfig() => new()
    {
        Architecture = "InternLM2ForCausalLM", HiddenSize = 64, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
        IntermediateSize = 160, VocabSize = 300, RopeTheta = 1_000_000, MaxPositionEmbeddings = 256,
    };
}

/// <summary>A fact that needs NVRTC (libnvrtc.so.*) on this machine; skipped where it is absent.</summary>
public sealed class NvrtcFactAttribute : FactAttribute
{
    private static readonly Lazy<string?> Missing = new(() =>
    {
        try { Nvrtc.Load(); return null; }
        catch (CudaException) { return "NVRTC is not installed here"; }
    });

    public NvrtcFactAttribute()
    {
        if (Missing.Value is { } reason) Skip = reason;
    }
}
