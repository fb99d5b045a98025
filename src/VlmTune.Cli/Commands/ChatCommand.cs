using System.CommandLine;
using System.Text.Json;
using System.Text.Encodings.Web;
using VlmTune.Inference;
using VlmTune.Models;
using VlmTune.Text;

namespace VlmTune.Cli.Commands;

/// <summary><c>vlmtune chat</c>: one answer with --prompt, otherwise an interactive multi-turn chat.</summary>
internal static class ChatCommand
{
    private static readonly Option<string> Model = new("--model") { Description = "InternVL2 model folder (config.json, *.safetensors, tokenizer.model).", Required = true };
    private static readonly Option<string[]> Images = new("--image") { Description = "Image file; repeat for several (placed at <image> placeholders in order).", AllowMultipleArgumentsPerToken = false };
    private static readonly Option<string?> Prompt = new("--prompt") { Description = "The question. Without it, chat interactively." };
    private static readonly Option<string?> System = new("--system") { Description = "System message. [default: the chat template's]" };
    private static readonly Option<int> MaxNewTokens = new("--max-new-tokens") { Description = "Most tokens to generate.", DefaultValueFactory = _ => 512 };
    private static readonly Option<double> Temperature = new("--temperature") { Description = "Sampling temperature; 0 = greedy.", DefaultValueFactory = _ => 0.0 };
    private static readonly Option<double> TopP = new("--top-p") { Description = "Nucleus sampling: sample among the most likely tokens whose probabilities add up to this; 1 = off.", DefaultValueFactory = _ => 1.0 };
    private static readonly Option<int> TopK = new("--top-k") { Description = "Sample among the K most likely tokens; 0 = off.", DefaultValueFactory = _ => 0 };
    private static readonly Option<double> RepetitionPenalty = new("--repetition-penalty") { Description = "transformers' repetition_penalty on tokens of the prompt and answer so far; 1 = off.", DefaultValueFactory = _ => 1.0 };
    private static readonly Option<long?> Seed = new("--seed") { Description = "Seed for sampling." };
    private static readonly Option<int?> MaxTiles = new("--max-tiles") { Description = "Most tiles per image. [default: the model's max_dynamic_patch]" };
    private static readonly Option<string> Device = new("--device") { Description = $"{TensorPlacement.DeviceNames}.", DefaultValueFactory = _ => "cpu" };
    private static readonly Option<string?> DType = new("--dtype") { Description = $"{TensorPlacement.DTypeNames}. [default: float32 on CPU, bfloat16 on CUDA]" };
    private static readonly Option<string?> Adapter = new("--adapter") { Description = "Fine-tuned adapter to run unmerged: a training checkpoint (iter_<n>/ or its work dir) or a PEFT LoRA folder." };
    private static readonly Option<bool> Nf4Base = new("--nf4-base") { Description = "With --adapter: run a QLoRA adapter on the NF4-quantised LLM, as it was trained, instead of the original weights." };
    private static readonly Option<bool> Json = new("--json") { Description = "Print one JSON object: text, token_ids, prompt_tokens, prompt_ids, tiles." };

    public static Command Create(RuntimeSwitches switches)
    {
        var command = new Command("chat", "Chat with an InternVL2 model, with images.")
        {
            Model, Images, Prompt, System, MaxNewTokens, Temperature, TopP, TopK, RepetitionPenalty, Seed, MaxTiles, Device, DType, Adapter, Nf4Base, Json,
        };
        command.SetAction((parse, ct) => CliErrors.RunAsync(() => Task.FromResult(Run(parse, switches, ct))));
        return command;
    }

    private static int Run(ParseResult parse, RuntimeSwitches switches, CancellationToken ct)
    {
        Cuda.AttentionBackends.ForServing(switches);
        var sampling = new SamplingOptions
        {
            Temperature = parse.GetValue(Temperature), TopP = parse.GetValue(TopP), TopK = parse.GetValue(TopK),
            RepetitionPenalty = parse.GetValue(RepetitionPenalty), Seed = parse.GetValue(Seed), MaxNewTokens = parse.GetValue(MaxNewTokens),
        };
        var problems = sampling.Validate().ToList();
        if (parse.GetValue(MaxTiles) is < 1) problems.Add("--max-tiles must be ≥ 1.");
        if (parse.GetValue(Nf4Base) && parse.GetValue(Adapter) is null) problems.Add("--nf4-base needs --adapter.");
        if (problems.Count > 0) throw new VlmTuneException(string.Join(" ", problems));
        var images = parse.GetValue(Images) ?? [];
        foreach (var image in images)
            if (!File.Exists(image)) throw new VlmTuneException($"{image}: image file not found.");

        using var chat = InternVLChat.Load(parse.GetValue(Model)!, new ChatLoadOptions
        {
            Device = parse.GetValue(Device)!, DType = TensorPlacement.ParseDType(parse.GetValue(DType)), MaxTiles = parse.GetValue(MaxTiles),
            AdapterDir = parse.GetValue(Adapter), AdapterNf4Base = parse.GetValue(Nf4Base), MergeAdapter = false, Switches = switches,
        });
        string? system = parse.GetValue(System);
        string? prompt = parse.GetValue(Prompt);
        bool json = parse.GetValue(Json);

        if (prompt is not null)
        {
            var request = new ChatRequest { Question = prompt, ImagePaths = images, SystemMessage = system, Sampling = sampling };
            if (json)
            {
                var reply = chat.Chat(request, cancellation: ct);
                Console.WriteLine(JsonSerializer.Serialize(new
                {
                    text = reply.Text, token_ids = reply.TokenIds, prompt_tokens = reply.PromptTokens, prompt_ids = reply.PromptIds, tiles = reply.Tiles,
                    finish_reason = reply.FinishReason == FinishReason.Length ? "length" : "stop",
                }, new JsonSerializerOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }));
            }
            else
            {
                chat.Chat(request, Console.Write, ct);
                Console.WriteLine();
            }
            return 0;
        }

        // Interactive: as the official multi-turn chat, the images go with every turn and the first question carries
        // their <image> placeholders, which stay in the history.
        var history = new List<ChatTurn>();
        Console.Error.WriteLine("Interactive chat. Empty line or Ctrl-D to quit.");
        while (!ct.IsCancellationRequested)
        {
            Console.Write("user> ");
            var line = Console.ReadLine();
            if (string.IsNullOrWhiteSpace(line)) break;
            Console.Write("assistant> ");
            var reply = chat.Chat(new ChatRequest
            {
                Question = line, ImagePaths = images, History = history, SystemMessage = system, Sampling = sampling,
            }, Console.Write, ct);
            Console.WriteLine();
            history.Add(new ChatTurn(history.Count == 0 && images.Length > 0 && !line.Contains("<image>") ? "<image>\n" + line : line, reply.Text));
        }
        return 0;
    }
}
