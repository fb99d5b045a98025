using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Tests.Training;

/// <summary>bf16 training runs LoRA branches in bf16 from fp32 weights (autocast), PEFT inference in fp32.</summary>
public sealed class LoraAutocastTests
{
    private static Linear Make(bool autocast)
    {
        manual_seed(3);
        var linear = new Linear(64, 48, false, new ModelOptions { Device = CPU, DType = ScalarType.BFloat16 });
        using (no_grad()) linear.weight.normal_(0, 0.05);
        linear.AddLora(8, 16, 0.0, ScalarType.Float32);
        using (no_grad()) linear.lora_B!.weight.normal_(0, 0.05);
        linear.LoraAutocast = autocast;
        return linear;
    }

    [Fact]
    public void AutocastComputesTheBranchInTheInputDtypeAndKeepsFp32Gradients()
    {
        using var scope = NewDisposeScope();
        var x = randn(new long[] { 5, 64 }, generator: new Generator(1)).to_type(ScalarType.BFloat16);
        var fast = Make(autocast: true);
        var peft = Make(autocast: false);
        var y = fast.forward(x);
        Assert.Equal(ScalarType.BFloat16, y.dtype);

        // What autocast does: bf16 operands, bf16 results.
        var a = fast.lora_A!.weight.detach().to_type(ScalarType.BFloat16);
        var b = fast.lora_B!.weight.detach().to_type(ScalarType.BFloat16);
        var expected = nn.functional.linear(x, fast.weight) + nn.functional.linear(nn.functional.linear(x, a), b) * 2.0;
        Assert.Equal(0f, (y - expected).abs().max().to_type(ScalarType.Float32).item<float>());
        // Close to the fp32 (PEFT) branch, but not computed that way.
        var reference = peft.forward(x);
        float diff = (y - reference).abs().max().to_type(ScalarType.Float32).item<float>();
        Assert.True(diff < 0.05f, $"{diff}");

        y.to_type(ScalarType.Float32).sum().backward();
        Assert.Equal(ScalarType.Float32, fast.lora_A!.weight.grad!.dtype);
        Assert.True(fast.lora_B!.weight.grad!.abs().sum().item<float>() > 0);
    }
}
