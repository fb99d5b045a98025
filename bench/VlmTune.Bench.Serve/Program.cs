using System.Diagnostics;
using System.Text;
using System.Text.Json;
using VlmTune.Inference;
using VlmTune.Serving;

// Load benchmark of `vlmtune serve` (not a test): closed-loop clients streaming chat completions against an
// in-process server; prints requests/s and p50/p99 time-to-first-token and time-per-output-token per concurrency.
//   dotnet run -c Release --project bench/VlmTune.Bench.Serve -- [--model DIR] [--clients 1,8,32] [--requests-per-client N]
//                                                            [--max-tokens N] [--image FILE] [--device cpu]
//                                                            [--distinct-images 1] [--prefix-cache-mib N] [--image-cache-mib N]
//                                                            [--max-prefill-tokens N] [--max-waiting-steps N]
//                                                            [--temperature T] [--top-p P]
// --distinct-images 1: every request's image is the given one with a few pixels of its own, so no request shares
// image features or a prompt prefix past the image with another (the cold path); by default all send the same image.
// --temperature T (default 0, greedy) and --top-p P: every request samples so, each with a seed of its own.
// --engine-only 1: the engine alone (no HTTP, no detokenizing); --profile 1: cost of one decode step's parts by batch size.
var arguments = ParseArgs(args);
string model = arguments.GetValueOrDefault("model") ?? Path.GetFullPath(Path.Combine(AppContext.BaseDirectory, "../../../../../../shared/fixtures/tiny-internvl2/model"));
int[] levels = (arguments.GetValueOrDefault("clients") ?? "1,8,32").Split(',').Select(int.Parse).ToArray();
int perClient = int.Parse(arguments.GetValueOrDefault("requests-per-client") ?? "4");
int maxTokens = int.Parse(arguments.GetValueOrDefault("max-tokens") ?? "64");
string? image = arguments.GetValueOrDefault("image");
double temperature = double.Parse(arguments.GetValueOrDefault("temperature") ?? "0", System.Globalization.CultureInfo.InvariantCulture);
double topP = double.Parse(arguments.GetValueOrDefault("top-p") ?? "1", System.Globalization.CultureInfo.InvariantCulture);
int requestSeed = 0;
string device = arguments.GetValueOrDefault("device") ?? "cpu";
bool distinctImages = arguments.GetValueOrDefault("distinct-images") is "1" or "true";
long? prefixCacheMib = arguments.GetValueOrDefault("prefix-cache-mib") is { } pc ? long.Parse(pc) : null;
long? imageCacheMib = arguments.GetValueOrDefault("image-cache-mib") is { } ic ? long.Parse(ic) : null;
int maxPrefillTokens = arguments.GetValueOrDefault("max-prefill-tokens") is { } mp ? int.Parse(mp) : new EngineOptions().MaxPrefillTokens;
int maxWaitingSteps = arguments.GetValueOrDefault("max-waiting-steps") is { } mw ? int.Parse(mw) : new EngineOptions().MaxWaitingSteps;
byte[]? imageBytes = image is null ? null : File.ReadAllBytes(image);
int imageVariant = 0;

// An entry point: the VLMTUNE_* switches (e.g. VLMTUNE_FUSED_DECODE=0) are read here, as the CLI reads them.
var switches = VlmTune.RuntimeSwitches.FromEnvironment();
VlmTune.Cuda.AttentionBackends.ForServing(switches);   // as `vlmtune serve` does, before any attention runs
using var chat = InternVLChat.Load(model, new ChatLoadOptions { Device = device, Switches = switches });
var options = new ServerOptions
{
    ModelDir = model, ModelId = "bench", Port = 0, MaxBatch = levels.Max(), MaxConcurrentRequests = 4 * levels.Max(),
    PrefixCacheMib = prefixCacheMib, ImageCacheMib = imageCacheMib, MaxPrefillTokens = maxPrefillTokens, MaxWaitingSteps = maxWaitingSteps,
};
var client = VlmTuneServer.CreateChatClient(chat, options);
using var engine = client.Engine;
await using var app = VlmTuneServer.Build(options, client);
await app.StartAsync();
using var http = new HttpClient { BaseAddress = VlmTuneServer.Address(app), Timeout = TimeSpan.FromMinutes(10) };

if (arguments.ContainsKey("profile"))
{
    using var noGrad = TorchSharp.torch.no_grad();
    var lm = chat.Model.language_model;
    foreach (int b in new[] { 1, 8, 32 })
    {
        using var cache = new VlmTune.Models.KvCache(lm.Config, b, 200, TorchSharp.torch.ScalarType.Float32, TorchSharp.torch.CPU);
        var x = TorchSharp.torch.randint(1000, 9000, [b, 50]);
        lm.Forward(lm.Embed(x), new VlmTune.Models.DecoderInputs { Cache = cache });
        double fwd = 0, head = 0, arg = 0;
        for (int i = 0; i < 50; i++)
        {
            using var scope = TorchSharp.torch.NewDisposeScope();
            var t0 = Stopwatch.GetTimestamp();
            var h = lm.Forward(lm.Embed(TorchSharp.torch.randint(1000, 9000, [b, 1])), new VlmTune.Models.DecoderInputs { Cache = cache });
            var t1 = Stopwatch.GetTimestamp();
            var logits = lm.Logits(h)[.., 0];
            var t2 = Stopwatch.GetTimestamp();
            var ids = logits.argmax(-1).data<long>().ToArray();
            var t3 = Stopwatch.GetTimestamp();
            fwd += Stopwatch.GetElapsedTime(t0, t1).TotalMilliseconds; head += Stopwatch.GetElapsedTime(t1, t2).TotalMilliseconds; arg += Stopwatch.GetElapsedTime(t2, t3).TotalMilliseconds;
        }
        Console.WriteLine($"B={b}: forward {fwd / 50:0.00}ms head {head / 50:0.00}ms argmax {arg / 50:0.00}ms");
    }
    return 0;
}
if (arguments.ContainsKey("engine-only"))
{
    // The engine alone (no HTTP, no detokenizing): what continuous batching itself sustains.
    var ids = chat.Tokenizer.Encode("<|im_start|>user\nTell me a long story about the sea.<|im_end|><|im_start|>assistant\n");
    Console.WriteLine($"{"clients",7} {"tok/s",8} {"step p50",9}");
    foreach (int clients in levels.Prepend(1))
    {
        var wallClock = Stopwatch.StartNew();
        long stepsBefore = engine.Stats.Steps;
        var results = await Task.WhenAll(Enumerable.Range(0, clients * perClient).Select(_ =>
            engine.GenerateAsync(new GenerationRequest { PromptIds = ids, Sampling = new SamplingOptions { MaxNewTokens = maxTokens, Temperature = temperature, TopP = topP, Seed = Interlocked.Increment(ref requestSeed) } })));
        double secs = wallClock.Elapsed.TotalSeconds;
        long steps = engine.Stats.Steps - stepsBefore;
        Console.WriteLine($"{clients,7} {results.Sum(r => r.TokenIds.Count) / secs,8:0.0} {Ms(secs / steps),9}");
    }
    return 0;
}
Console.WriteLine($"model {model} on {device}, torch threads {TorchSharp.torch.get_num_threads()}, {Environment.ProcessorCount} cores; max_tokens {maxTokens}, temperature {temperature}, top_p {topP}, {perClient} requests per client" +
    $"{(image is null ? "" : distinctImages ? ", one image of its own per request" : ", the same image in every request")}; prefix cache {engine.PrefixCache.CapacityBytes >> 20} MiB, " +
    $"image cache {engine.ImageCache.CapacityBytes >> 20} MiB, max prefill tokens {engine.Options.MaxPrefillTokens}, max waiting steps {engine.Options.MaxWaitingSteps}");
await RunLevel(1, 1, quiet: true);   // warm-up: JIT, allocator, first kernels
Console.WriteLine($"{"clients",7} {"requests",8} {"req/s",7} {"tok/s",7} {"TTFT p50",9} {"TTFT p99",9} {"TPOT p50",9} {"TPOT p99",9} {"peak batch",10} {"prefills",8} {"cached tok",10} {"queue avg",9} {"srv TTFT avg",12}");
foreach (int clients in levels) await RunLevel(clients, perClient, quiet: false);
await app.StopAsync();
return 0;

async Task RunLevel(int clients, int requestsEach, bool quiet)
{
    var ttft = new List<double>();
    var tpot = new List<double>();
    long tokens = 0;
    long passesBefore = engine.PrefillPasses, reusedBefore = engine.PrefixCache.ReusedTokens;
    var metricsBefore = await Scrape();
    var wall = Stopwatch.StartNew();
    await Task.WhenAll(Enumerable.Range(0, clients).Select(async c =>
    {
        for (int r = 0; r < requestsEach; r++)
        {
            var (first, perToken, count) = await Request($"Client {c}, question {r}: tell me a long story about the sea.");
            lock (ttft)
            {
                ttft.Add(first);
                if (count > 1) tpot.Add(perToken);
                tokens += count;
            }
        }
    }));
    wall.Stop();
    if (quiet) return;
    double seconds = wall.Elapsed.TotalSeconds;
    // Server-side means over the level (from /metrics): time in the engine's queue, and request read to first token.
    var metricsAfter = await Scrape();
    double Mean(string histogram) =>
        (metricsAfter.GetValueOrDefault(histogram + "_sum") - metricsBefore.GetValueOrDefault(histogram + "_sum"))
        / Math.Max(1, metricsAfter.GetValueOrDefault(histogram + "_count") - metricsBefore.GetValueOrDefault(histogram + "_count"));
    Console.WriteLine($"{clients,7} {ttft.Count,8} {ttft.Count / seconds,7:0.00} {tokens / seconds,7:0.0} {Ms(Percentile(ttft, 50)),9} {Ms(Percentile(ttft, 99)),9} {Ms(Percentile(tpot, 50)),9} {Ms(Percentile(tpot, 99)),9} {engine.Stats.PeakBatch,10} {engine.PrefillPasses - passesBefore,8} {engine.PrefixCache.ReusedTokens - reusedBefore,10} {Ms(Mean("vlmtune_request_queue_time_seconds")),9} {Ms(Mean("vlmtune_time_to_first_token_seconds")),12}");
}

// The model's histogram sums and counts in /metrics, by series name.
async Task<Dictionary<string, double>> Scrape()
{
    var values = new Dictionary<string, double>();
    foreach (var line in (await http.GetStringAsync("/metrics")).Split('\n'))
    {
        if (!line.StartsWith("vlmtune_") || !line.Contains("model=\"bench\"") || !(line.Contains("_sum{") || line.Contains("_count{"))) continue;
        var name = line[..line.IndexOf('{')];
        values[name] = double.Parse(line[(line.LastIndexOf(' ') + 1)..], System.Globalization.CultureInfo.InvariantCulture);
    }
    return values;
}

async Task<(double Ttft, double Tpot, int Tokens)> Request(string text)
{
    var content = new List<object>();
    if (imageBytes is not null)
    {
        var bytes = distinctImages ? Variant(imageBytes, Interlocked.Increment(ref imageVariant)) : imageBytes;
        content.Add(new { type = "image_url", image_url = new { url = "data:image/jpeg;base64," + Convert.ToBase64String(bytes) } });
    }
    content.Add(new { type = "text", text });
    var body = JsonSerializer.Serialize(new
    {
        model = "bench", stream = true, stream_options = new { include_usage = true }, max_tokens = maxTokens, temperature, top_p = topP,
        seed = Interlocked.Increment(ref requestSeed),
        messages = new[] { new { role = "user", content } },
    });
    var clock = Stopwatch.StartNew();
    using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions") { Content = new StringContent(body, Encoding.UTF8, "application/json") };
    using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
    response.EnsureSuccessStatusCode();
    using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
    double first = -1, last = 0;
    int completion = 0;
    while (await reader.ReadLineAsync() is { } line)
    {
        if (!line.StartsWith("data: ") || line == "data: [DONE]") continue;
        using var doc = JsonDocument.Parse(line[6..]);
        var root = doc.RootElement;
        if (root.TryGetProperty("usage", out var usage) && usage.ValueKind == JsonValueKind.Object) completion = usage.GetProperty("completion_tokens").GetInt32();
        if (root.GetProperty("choices") is { ValueKind: JsonValueKind.Array } choices && choices.GetArrayLength() > 0
            && choices[0].GetProperty("delta").TryGetProperty("content", out var delta) && delta.GetString() is { Length: > 0 })
        {
            if (first < 0) first = clock.Elapsed.TotalSeconds;
            last = clock.Elapsed.TotalSeconds;
        }
    }
    return (first, completion > 1 ? (last - first) / (completion - 1) : 0, completion);
}

// The image with a 4×4 block of pixels set from the request number: other tiles, so other features and prompt blocks.
static byte[] Variant(byte[] jpeg, int n)
{
    using var bitmap = SkiaSharp.SKBitmap.Decode(jpeg);
    var colour = new SkiaSharp.SKColor((byte)(n * 37), (byte)(n * 101 >> 2), (byte)(n * 13 >> 4));
    for (int y = 0; y < 4; y++) for (int x = 0; x < 4; x++) bitmap.SetPixel((n * 4 + x) % bitmap.Width, y, colour);
    using var data = bitmap.Encode(SkiaSharp.SKEncodedImageFormat.Jpeg, 95);
    return data.ToArray();
}

static double Percentile(List<double> values, double p)
{
    if (values.Count == 0) return double.NaN;
    var sorted = values.Order().ToArray();
    return sorted[Math.Clamp((int)Math.Ceiling(p / 100 * sorted.Length) - 1, 0, sorted.Length - 1)];
}

static string Ms(double seconds) => double.IsNaN(seconds) ? "-" : $"{seconds * 1000:0.0}ms";

static Dictionary<string, string> ParseArgs(string[] args)
{
    var map = new Dictionary<string, string>();
    for (int i = 0; i + 1 < args.Length; i += 2)
    {
        if (!args[i].StartsWith("--")) throw new ArgumentException($"unexpected argument '{args[i]}'");
        map[args[i][2..]] = args[i + 1];
    }
    return map;
}
