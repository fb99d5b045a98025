using TorchSharp;
using VlmTune.Models;
using VlmTune.Training;
using static TorchSharp.torch;

namespace VlmTune.Tests.Models;

/// <summary>One parser for device and dtype names: every entry point takes the same spellings and says which option is wrong.</summary>
public sealed class TensorPlacementTests
{
    [Theory]
    [InlineData("float32", ScalarType.Float32)]
    [InlineData("fp32", ScalarType.Float32)]
    [InlineData("bfloat16", ScalarType.BFloat16)]
    [InlineData("bf16", ScalarType.BFloat16)]
    [InlineData("float16", ScalarType.Float16)]
    [InlineData("fp16", ScalarType.Float16)]
    public void EveryDTypeSpellingParses(string name, ScalarType expected)
    {
        Assert.Equal(expected, TensorPlacement.ParseDType(name));
        Assert.Contains(name, TensorPlacement.DTypeNames);   // the help texts list it
    }

    [Fact]
    public void AnUnknownDTypeIsOneLineNamingTheOption()
    {
        Assert.Null(TensorPlacement.ParseDType(null));
        var e = Assert.Throws<VlmTuneException>(() => TensorPlacement.ParseDType("int8"));
        Assert.Equal("--dtype 'int8' is not supported (float32, bfloat16, float16).", e.Message);
        Assert.StartsWith("--out-dtype 'BF16' ", Assert.Throws<VlmTuneException>(() => TensorPlacement.ParseDType("BF16", "--out-dtype")).Message);
    }

    [Fact]
    public void ConfigAndShortNamesRoundTrip()
    {
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16, ScalarType.Float16 })
        {
            Assert.Equal(dtype, TensorPlacement.ParseDType(TensorPlacement.ConfigName(dtype)));
            Assert.Equal(dtype, TensorPlacement.ParseDType(TensorPlacement.ShortName(dtype)));
        }
        Assert.Equal(("bfloat16", "bf16"), (TensorPlacement.ConfigName(ScalarType.BFloat16), TensorPlacement.ShortName(ScalarType.BFloat16)));
    }

    [Theory]
    [InlineData("cpu", true)]
    [InlineData("cuda", true)]
    [InlineData("cuda:1", true)]
    [InlineData("cuda:x", false)]    // TorchSharp's own parser threw a FormatException here, not a message
    [InlineData("cuda:", false)]
    [InlineData("gpu", false)]
    [InlineData("CPU", false)]
    public void DeviceNamesAreCpuCudaOrCudaN(string name, bool valid)
    {
        Assert.Equal(valid, TensorPlacement.IsDeviceName(name));
        if (valid) return;
        var e = Assert.Throws<VlmTuneException>(() => TensorPlacement.ParseDevice(name));
        Assert.Equal($"--device '{name}' is not cpu, cuda or cuda:N.", e.Message);
    }

    [Fact]
    public void ParseDeviceRefusesCudaWithoutAGpu()
    {
        Assert.Equal(DeviceType.CPU, TensorPlacement.ParseDevice("cpu").type);
        if (cuda.is_available())
            Assert.Equal((DeviceType.CUDA, 1), (TensorPlacement.ParseDevice("cuda:1").type, (int)TensorPlacement.ParseDevice("cuda:1").index));
        else
            Assert.Equal("--device cuda:1: CUDA is not available (no GPU, or the app runs on the CPU-only libtorch).",
                Assert.Throws<VlmTuneException>(() => TensorPlacement.ParseDevice("cuda:1")).Message);
    }

    [Fact]
    public void TrainingRecipesTakeTheSameNamesAndKeepTheirOwnMessages()
    {
        const string minimal = "model: m\ndata: d.jsonl\n";
        Assert.Equal("bf16", TrainConfig.Parse(minimal + "dtype: bfloat16\n", "r.yaml").Dtype);
        Assert.Equal("fp32", TrainConfig.Parse(minimal + "dtype: float32\ndevice: cpu\n", "r.yaml").Dtype);
        Assert.Equal("fp32", TrainConfig.Parse(minimal, "r.yaml", ["dtype=fp32", "device=cuda:3"]).Dtype);
        Assert.Equal("auto", TrainConfig.Parse(minimal, "r.yaml").Dtype);

        var e = Assert.Throws<ConfigException>(() => TrainConfig.Parse(minimal + "dtype: float16\ndevice: gpu\n", "r.yaml"));
        Assert.Contains("'dtype': 'float16' is not auto, bf16 or fp32", e.Problems);   // fp16 training is not supported
        Assert.Contains("'device': 'gpu' is not cpu, cuda or cuda:N", e.Problems);
        // bfloat16 is bf16: refused on the CPU as bf16 is.
        var cpu = Assert.Throws<ConfigException>(() => TrainConfig.Parse(minimal + "dtype: bfloat16\ndevice: cpu\n", "r.yaml"));
        Assert.Contains(cpu.Problems, p => p.StartsWith("'dtype': bf16 training on CPU is not supported"));
    }
}
