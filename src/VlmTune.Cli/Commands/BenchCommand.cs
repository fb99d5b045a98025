using System.CommandLine;
using System.Diagnostics;
using System.Text.Json;
using TorchSharp;
using VlmTune.Diagnostics;
using VlmTune.Inference;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Cli.Commands;

/// <summary>
/// <c>vlmtune bench decode</c>: shape-true decoding throughput with random weights built from a config.json
/// (e.g. the released InternVL2-2B's). Prints one JSON line per result.
/// </summary>
internal static class BenchCommand
{
    private static readonly Option<string> Config = new("--config") { Description = "config.json giving the model shapes.", Required = true };
    private static readonly Option<string> Device = new("--device") { DefaultValueFactory = _ => "cuda" };
    private static readonly Option<string?> DType = new("--dtype") { Description = "Default: bfloat16 on CUDA, float32 on CPU." };
    private static readonly Option<int[]> Batch = new("--batch") { Description = "Batch sizes to measure.", DefaultValueFactory = _ => [1], AllowMultipleArgumentsPerToken = true };
    private static readonly Option<int> PromptTokens = new("--prompt-tokens") { DefaultValueFactory = _ => 3400 };
    private static readonly Option<int> Tiles = new("--tiles") { Description = "Image tiles in the prompt (256 tokens each).", DefaultValueFactory = _ => 13 };
    private static readonly Option<int> NewTokens = new("--new-tokens") { DefaultValueFactory = _ => 128 };
    private static readonly Option<int> Warmup = new("--warmup") { DefaultValueFactory = _ => 8 };

    public static Command Create()
    {
        var decode = new Command("decode", "Prefill an image prompt, then time greedy decoding.")
        {
            Config, Device, DType, Batch, PromptTokens, Tiles, NewTokens, Warmup,
        };
        decode.SetAction((parse, ct) => CliErrors.RunAsync(() => Task.FromResult(Decode(parse))));
        return new Command("bench", "Performance benchmarks with random shape-true weights.") { decode };
    }

    private static int Decode(ParseResult parse)
    {
        var device = InternVLChat.ParseDevice(parse.GetValue(Device)!);
        var dtype = ChatCommand.ParseDType(parse.GetValue(DType)) ?? (device.type == DeviceType.CUDA ? ScalarType.BFloat16 : ScalarType.Float32);
        var config = InternVLConfig.Load(parse.GetValue(Config)!);
        using var memory = new GpuMemoryMonitor(device.index < 0 ? 0 : device.index);
        using var model = new InternVLChatModel(config, new ModelOptions { Device = device, DType = dtype });
        RandomInit.Apply(model, seed: 0);
        model.eval();
        int tiles = parse.GetValue(Tiles), promptTokens = parse.GetValue(PromptTokens), newTokens = parse.GetValue(NewTokens);
        int imageTokens = tiles * config.NumImageToken;
        if (promptTokens < imageTokens + 8) throw new VlmTuneException($"--prompt-tokens must exceed the {imageTokens} image tokens of {tiles} tiles.");
        const int imgContext = 92546;

        foreach (int batch in parse.GetValue(Batch)!)
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var rng = new Random(batch);
            var ids = Enumerable.Range(0, promptTokens).Select(i => i >= 40 && i < 40 + imageTokens ? imgContext : (long)rng.Next(1000, 90000)).ToArray();
            var input = tensor(ids, device: device).unsqueeze(0).expand(batch, promptTokens).contiguous();
            var pixels = randn(new long[] { tiles * batch, 3, 448, 448 }, dtype, device);

            Sync(device);
            var clock = Stopwatch.StartNew();
            var features = model.ExtractFeatures(pixels);
            Sync(device);
            double visionS = clock.Elapsed.TotalSeconds;
            clock.Restart();
            using var cache = new KvCache(config.Llm, batch, promptTokens + newTokens + parse.GetValue(Warmup), dtype, device);
            var embeds = model.EmbedWithImages(input, features, imgContext);
            var hidden = model.language_model.Forward(embeds, new DecoderInputs { Cache = cache });
            var next = model.language_model.Logits(hidden[.., ^1..]).argmax(-1);               // (B, 1)
            Sync(device);
            double prefillS = clock.Elapsed.TotalSeconds;

            // Greedy steps stay on the device: no host synchronisation inside the loop.
            Tensor Step(Tensor token)
            {
                using var stepScope = NewDisposeScope();
                var h = model.language_model.Forward(model.language_model.Embed(token), new DecoderInputs { Cache = cache });
                return model.language_model.Logits(h).argmax(-1).MoveToOuterDisposeScope();
            }
            for (int i = 0; i < parse.GetValue(Warmup); i++) next = Step(next);
            Sync(device);
            clock.Restart();
            for (int i = 0; i < newTokens; i++) next = Step(next);
            Sync(device);
            double decodeS = clock.Elapsed.TotalSeconds;
            Console.WriteLine(JsonSerializer.Serialize(new
            {
                bench = "decode", device = device.ToString(), dtype = dtype.ToString(), batch, prompt_tokens = promptTokens, tiles,
                new_tokens = newTokens, vision_s = Math.Round(visionS, 4), prefill_s = Math.Round(prefillS, 4),
                decode_step_ms = Math.Round(decodeS / newTokens * 1000, 3),
                decode_tokens_per_s = Math.Round(batch * newTokens / decodeS, 1),
                peak_gpu_mem_gib = memory.PeakBytes is { } peak ? Math.Round(peak / (double)(1L << 30), 2) : (double?)null,
            }));
        }
        return 0;
    }

    private static void Sync(Device device)
    {
        if (device.type == DeviceType.CUDA) cuda.synchronize(device);
    }
}
