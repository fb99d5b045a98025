using System.CommandLine;
using System.Runtime.InteropServices;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.Configuration;
using VlmTune.Inference;
using VlmTune.Models;
using VlmTune.Serving;

namespace VlmTune.Cli.Commands;

/// <summary><c>vlmtune serve</c>: the OpenAI-compatible server, the chat page, continuous batching.</summary>
internal static class ServeCommand
{
    // The defaults help shows are ServerOptions' own (VLMTUNE_Serve__* variables may change them).
    private static readonly ServerOptions Defaults = new();

    private static readonly Option<string> Model = new("--model") { Description = "InternVL2 model folder.", Required = true };
    private static readonly Option<string[]> Adapter = new("--adapter")
    {
        Description = "NAME=PATH: serve the adapter in PATH as model NAME beside the base (repeatable; one batch for all). " +
                      "A bare PATH: the one served model is the base with that adapter merged in.",
    };
    private static readonly Option<string?> AllowAdapterLoading = new("--allow-adapter-loading") { Description = "Folder under which POST /v1/adapters may load adapters at run time (needs --api-key)." };
    private static readonly Option<string?> Host = new("--host") { Description = $"Address to listen on; 0.0.0.0 for all. [default: {Defaults.Host}]" };
    private static readonly Option<int?> Port = new("--port") { Description = $"Port to listen on; 0 for any free port. [default: {Defaults.Port}]" };
    private static readonly Option<string?> ApiKey = new("--api-key") { Description = "Require 'Authorization: Bearer KEY' on every endpoint but /health." };
    private static readonly Option<int?> MaxBatch = new("--max-batch") { Description = $"Requests decoded together. [default: {Defaults.MaxBatch}]" };
    private static readonly Option<long?> ImageCacheMib = new("--image-cache-mib")
    {
        Description = "MiB of image features kept for images sent again (they skip the vision encoder); 0: off. [default: 512 on CUDA, 64 on the CPU]",
    };
    private static readonly Option<long?> PrefixCacheMib = new("--prefix-cache-mib")
    {
        Description = "MiB of prompt-prefix keys and values kept for prompts that start alike (system prompt, same image); 0: off. [default: 2048 on CUDA, 128 on the CPU]",
    };
    private static readonly Option<int?> MaxPrefillTokens = new("--max-prefill-tokens")
    {
        Description = "Tokens one prefill pass computes at most: waiting prompts are prefilled together up to it, longer ones in chunks between decode steps. [default: 8192]",
    };
    private static readonly Option<int?> MaxWaitingSteps = new("--max-waiting-steps")
    {
        Description = "Decode steps a prompt may wait while streams decode, so that fewer, fuller prefill passes interrupt them; 0: prefill at once. [default: 16]",
    };
    private static readonly Option<int?> MaxTiles = new("--max-tiles") { Description = "Most tiles per image, thumbnail excluded. [default: the model's max_dynamic_patch]" };
    private static readonly Option<string?> AllowLocalImages = new("--allow-local-images") { Description = "Folder whose images requests may name by path or file:// URL." };
    private static readonly Option<bool> AllowRemoteImages = new("--allow-remote-images") { Description = "Fetch http(s) image URLs (public addresses only)." };
    private static readonly Option<string[]> AllowImageNetwork = new("--allow-image-network") { Description = "CIDR network remote images may come from although private/loopback (repeatable)." };
    private static readonly Option<string?> ModelId = new("--model-id") { Description = "Model name clients use. [default: the model folder's name]" };
    private static readonly Option<string?> Device = new("--device") { Description = $"{TensorPlacement.DeviceNames}. [default: {Defaults.Device}]" };
    private static readonly Option<string?> DType = new("--dtype") { Description = $"{TensorPlacement.DTypeNames}. [default: float32 on CPU, bfloat16 on CUDA]" };
    private static readonly Option<string[]> AllowedHosts = new("--allowed-hosts") { Description = "Host header names accepted besides loopback ones (example.com, *.example.com, * for any; repeatable)." };

    public static Command Create(RuntimeSwitches switches)
    {
        var command = new Command("serve", "Serve a model over an OpenAI-compatible HTTP API, with a chat page at /.")
        {
            Model, Adapter, AllowAdapterLoading, Host, Port, ApiKey, MaxBatch, ImageCacheMib, PrefixCacheMib, MaxPrefillTokens, MaxWaitingSteps, MaxTiles, AllowLocalImages, AllowRemoteImages, AllowImageNetwork, ModelId, Device, DType, AllowedHosts,
        };
        command.SetAction((parse, ct) => CliErrors.RunAsync(() => RunAsync(parse, switches, ct)));
        return command;
    }

    /// <summary>Flags override VLMTUNE_Serve__* environment variables, which override the defaults.</summary>
    internal static ServerOptions Bind(ParseResult parse)
    {
        var flags = new Dictionary<string, string?>();
        void Set<T>(string key, T? value) { if (value is not null) flags[$"{ServerOptions.Section}:{key}"] = Convert.ToString(value, System.Globalization.CultureInfo.InvariantCulture); }
        Set(nameof(ServerOptions.ModelDir), parse.GetValue(Model));
        var adapters = parse.GetValue(Adapter) ?? [];
        var bare = adapters.Where(a => !ServerOptions.IsNamedAdapter(a)).ToList();
        if (bare.Count > 1)
            throw new VlmTuneException($"--adapter: {bare.Count} bare paths given; one adapter is merged into the served model, several need names: --adapter NAME=PATH.");
        Set(nameof(ServerOptions.AdapterDir), bare.FirstOrDefault());
        var named = adapters.Where(ServerOptions.IsNamedAdapter).ToArray();
        for (int i = 0; i < named.Length; i++) Set($"{nameof(ServerOptions.Adapters)}:{i}", named[i]);
        Set(nameof(ServerOptions.AllowAdapterLoading), parse.GetValue(AllowAdapterLoading));
        Set(nameof(ServerOptions.Host), parse.GetValue(Host));
        Set(nameof(ServerOptions.Port), parse.GetValue(Port));
        Set(nameof(ServerOptions.ApiKey), parse.GetValue(ApiKey));
        Set(nameof(ServerOptions.MaxBatch), parse.GetValue(MaxBatch));
        Set(nameof(ServerOptions.ImageCacheMib), parse.GetValue(ImageCacheMib));
        Set(nameof(ServerOptions.PrefixCacheMib), parse.GetValue(PrefixCacheMib));
        Set(nameof(ServerOptions.MaxPrefillTokens), parse.GetValue(MaxPrefillTokens));
        Set(nameof(ServerOptions.MaxWaitingSteps), parse.GetValue(MaxWaitingSteps));
        Set(nameof(ServerOptions.MaxTiles), parse.GetValue(MaxTiles));
        Set(nameof(ServerOptions.AllowLocalImages), parse.GetValue(AllowLocalImages));
        if (parse.GetValue(AllowRemoteImages)) Set(nameof(ServerOptions.AllowRemoteImages), true);
        Set(nameof(ServerOptions.ModelId), parse.GetValue(ModelId));
        Set(nameof(ServerOptions.Device), parse.GetValue(Device));
        var networks = parse.GetValue(AllowImageNetwork) ?? [];
        for (int i = 0; i < networks.Length; i++) Set($"{nameof(ServerOptions.AllowedImageNetworks)}:{i}", networks[i]);
        var hosts = (parse.GetValue(AllowedHosts) ?? []).SelectMany(h => h.Split(';', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)).ToArray();
        for (int i = 0; i < hosts.Length; i++) Set($"{nameof(ServerOptions.AllowedHosts)}:{i}", hosts[i]);
        var configuration = new ConfigurationBuilder()
            .AddEnvironmentVariables("VLMTUNE_")
            .AddInMemoryCollection(flags)
            .Build();
        var options = configuration.GetSection(ServerOptions.Section).Get<ServerOptions>() ?? new ServerOptions();
        var problems = options.Validate().ToList();
        if (problems.Count > 0) throw new VlmTuneException(string.Join(" ", problems));
        return options;
    }

    private static async Task<int> RunAsync(ParseResult parse, RuntimeSwitches switches, CancellationToken ct)
    {
        Cuda.AttentionBackends.ForServing(switches);
        var options = Bind(parse);
        ListenErrors.ThrowIfUnavailable(options.Host, options.Port);
        using var chat = InternVLChat.Load(options.ModelDir, new ChatLoadOptions
        {
            Device = options.Device, DType = TensorPlacement.ParseDType(parse.GetValue(DType)), MaxTiles = options.MaxTiles,
            ImageLimits = new Vision.ImageLimits { MaxPixels = options.MaxImagePixels }, AdapterDir = options.AdapterDir, Switches = switches,
        });
        var client = VlmTuneServer.CreateChatClient(chat, options);
        using var engine = client.Engine;
        await using var app = VlmTuneServer.Build(options, client);
        // SIGTERM (systemd, Docker, Kubernetes) and SIGINT (Ctrl-C) stop the server gracefully; a second one ends it at once.
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        void OnSignal(PosixSignalContext signal)
        {
            if (stop.IsCancellationRequested) return;
            signal.Cancel = true;
            stop.Cancel();
        }
        using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, OnSignal);
        using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, OnSignal);
        await ListenErrors.StartAsync(app, options.Host, options.Port);
        if (client.Engine.Adapters is { } served)
        {
            foreach (var a in served.All) Console.WriteLine($"adapter {a.Name}: {a.Description}");
            Console.WriteLine($"{served.All.Count} adapter(s) beside {client.Options.ModelId}, batched over the unmerged base" +
                (options.AllowAdapterLoading is null ? "" : "; POST/DELETE /v1/adapters load and unload more") +
                (client.Engine.FusedDecodeOffReason is { } off && chat.Model.Options.Device.type == TorchSharp.DeviceType.CUDA ? $". Fused CUDA decoding is off: {off}." : "."));
        }
        Console.WriteLine($"Serving {client.Options.ModelId} on {VlmTuneServer.Address(app)} (chat page at /, API at /v1){(options.ApiKey is null ? "" : ", API key required")}. Ctrl-C to stop.");
        try { await Task.Delay(Timeout.Infinite, stop.Token); }
        catch (OperationCanceledException) { }
        Console.WriteLine($"Stopping: in-flight requests have {options.ShutdownGraceSeconds:0.#} s to finish.");
        await app.StopAsync(CancellationToken.None);
        Console.WriteLine("Stopped.");
        return 0;
    }
}
