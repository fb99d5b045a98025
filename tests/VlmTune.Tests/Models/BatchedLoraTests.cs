using VlmTune.Checkpoints;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Tests.Models;

/// <summary>Batched LoRA in one linear layer: each row group gets its own adapter's delta, base rows none.</summary>
public sealed class BatchedLoraTests
{
    private static Linear RandomLinear(Generator g)
    {
        var linear = new Linear(6, 5, hasBias: true, new ModelOptions());
        using (no_grad())
        {
            linear.weight.copy_(randn([5, 6], generator: g));
            linear.bias!.copy_(randn([5], generator: g));
        }
        return linear;
    }

    private static LoraBranches Adapter(Linear linear, int r, double scaling, Generator g) =>
        new(new Dictionary<Linear, LoraBranch> { [linear] = new(randn([r, 6], generator: g), randn([5, r], generator: g), scaling) });

    /// <summary>The layer with <paramref name="adapter"/> merged in, PEFT's way (W + B·A·scale), as the reference.</summary>
    private static Tensor Merged(Linear linear, LoraBranches? adapter, Tensor x)
    {
        if (adapter?.For(linear) is not { } b) return nn.functional.linear(x, linear.weight, linear.bias);
        using var w = LoraMerge.Merged(linear.weight, b.A, b.B, b.Scaling, "test");
        return nn.functional.linear(x, w, linear.bias);
    }

    [Fact]
    public void RowsTakeTheirOwnAdaptersDelta()
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var g = new Generator(5);
        var linear = RandomLinear(g);
        // Different ranks and scalings; rows interleaved, so no adapter's rows are one slice.
        using var a = Adapter(linear, r: 2, scaling: 2.0, g);
        using var b = Adapter(linear, r: 3, scaling: 0.5, g);
        LoraBranches?[] rows = [a, null, b, a, null];
        var x = randn([5, 3, 6], generator: g);                                     // (rows, T, in)

        Tensor y;
        using (LoraRouting.Begin(rows, CPU)) y = linear.forward(x);
        for (int i = 0; i < rows.Length; i++)
            Assert.True(allclose(y[i], Merged(linear, rows[i], x[i]), 1e-5, 1e-5), $"row {i}");

        // The routing ends with its scope: the same layer is the base again.
        Assert.Null(LoraRouting.Current);
        Assert.True(allclose(linear.forward(x), Merged(linear, null, x), 1e-6, 1e-6));
    }

    [Fact]
    public void OneAdapterForEveryRowAndLayersItDoesNotAdapt()
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var g = new Generator(9);
        var adapted = RandomLinear(g);
        var other = RandomLinear(g);
        using var a = Adapter(adapted, r: 4, scaling: 1.5, g);
        var x = randn([2, 6], generator: g);
        using (LoraRouting.Begin([a, a], CPU))
        {
            Assert.True(allclose(adapted.forward(x), Merged(adapted, a, x), 1e-5, 1e-5));
            // An adapter without a branch on a layer leaves that layer's output as the base's.
            Assert.True(allclose(other.forward(x), Merged(other, null, x), 1e-6, 1e-6));
        }
        // Rows the routing does not describe (a pass that split its batch) are refused, not given to the wrong adapter.
        using (LoraRouting.Begin([a, null, a], CPU)) Assert.Throws<InvalidOperationException>(() => adapted.forward(x));
        // No row with an adapter: nothing is routed.
        using (LoraRouting.Begin([null, null], CPU)) Assert.Null(LoraRouting.Current);
    }

    [Fact]
    public async Task RoutingBelongsToTheThreadThatRunsThePass()
    {
        using var scope = NewDisposeScope();
        var g = new Generator(3);
        var linear = RandomLinear(g);
        using var a = Adapter(linear, r: 2, scaling: 1, g);
        using var routing = LoraRouting.Begin([a], CPU);
        Assert.Same(routing, LoraRouting.Current);
        // Another engine's pass on the same model, on its own thread, sees no routing.
        Assert.Null(await Task.Factory.StartNew(() => LoraRouting.Current, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default));
    }
}
