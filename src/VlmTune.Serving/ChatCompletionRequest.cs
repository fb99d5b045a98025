using System.Text.Json;
using Microsoft.Extensions.AI;
using VlmTune.Inference;

namespace VlmTune.Serving;

/// <summary>An image of a message, still as the client named it.</summary>
public sealed record ImagePart(string Url, string? Detail, string Param);

/// <summary>A message as parsed: role, text parts and images in order.</summary>
public sealed record ParsedMessage(ChatRole Role, IReadOnlyList<object> Parts);

/// <summary>
/// The body of <c>POST /v1/chat/completions</c>, read field by field so every problem is reported with the field at
/// fault (param) rather than as a serializer message. Unknown fields are ignored, as clients send vendor extras.
/// </summary>
public sealed record ChatCompletionRequest
{
    public required string Model { get; init; }
    public required IReadOnlyList<ParsedMessage> Messages { get; init; }
    public double? Temperature { get; init; }
    public double? TopP { get; init; }
    public int? TopK { get; init; }
    public double? RepetitionPenalty { get; init; }
    /// <summary>max_completion_tokens, else max_tokens; its range is checked where every entry point's is (<see cref="SamplingOptions.Problems"/>).</summary>
    public int? MaxNewTokens { get; init; }
    public IReadOnlyList<string> Stop { get; init; } = [];
    public long? Seed { get; init; }
    public bool Stream { get; init; }
    public bool IncludeUsage { get; init; }

    public static ChatCompletionRequest Parse(JsonElement root)
    {
        if (root.ValueKind != JsonValueKind.Object) throw Bad("The request body must be a JSON object.", null);
        var model = root.TryGetProperty("model", out var m) && m.ValueKind == JsonValueKind.String ? Text(m, "model") : throw Bad("'model' is required and must be a string.", "model");
        if (!root.TryGetProperty("messages", out var msgs) || msgs.ValueKind != JsonValueKind.Array || msgs.GetArrayLength() == 0)
            throw Bad("'messages' is required and must be a non-empty array.", "messages");
        var messages = new List<ParsedMessage>();
        int i = 0;
        foreach (var msg in msgs.EnumerateArray()) messages.Add(ParseMessage(msg, i++));

        int? n = Int(root, "n");
        if (n is not null && n != 1) throw Bad("Only n = 1 is supported.", "n");
        foreach (var name in new[] { "frequency_penalty", "presence_penalty" })
            if (Number(root, name) is { } v && v != 0) throw Bad($"'{name}' is not supported (use repetition_penalty).", name);
        if (root.TryGetProperty("tools", out var tools) && tools.ValueKind == JsonValueKind.Array && tools.GetArrayLength() > 0)
            throw Bad("Tools are not supported by this model server.", "tools");
        if (root.TryGetProperty("response_format", out var rf) && rf.ValueKind == JsonValueKind.Object
            && rf.TryGetProperty("type", out var rft) && rft.ValueKind == JsonValueKind.String && !rft.ValueEquals("text"))
            throw Bad("Only response_format type 'text' is supported.", "response_format");
        if (root.TryGetProperty("logprobs", out var lp) && lp.ValueKind == JsonValueKind.True) throw Bad("logprobs are not supported.", "logprobs");

        var stop = new List<string>();
        if (root.TryGetProperty("stop", out var s) && s.ValueKind != JsonValueKind.Null)
        {
            if (s.ValueKind == JsonValueKind.String) stop.Add(Text(s, "stop"));
            else if (s.ValueKind == JsonValueKind.Array && s.EnumerateArray().All(e => e.ValueKind == JsonValueKind.String)) stop.AddRange(s.EnumerateArray().Select(e => Text(e, "stop")));
            else throw Bad("'stop' must be a string or an array of strings.", "stop");
            if (stop.Count > 4) throw Bad("'stop' may hold at most 4 sequences.", "stop");
            if (stop.Any(x => x.Length == 0 || x.Length > 256)) throw Bad("Stop sequences must be 1 to 256 characters.", "stop");
        }
        bool stream = Bool(root, "stream") ?? false;
        bool includeUsage = false;
        if (root.TryGetProperty("stream_options", out var so) && so.ValueKind != JsonValueKind.Null)
        {
            if (so.ValueKind != JsonValueKind.Object) throw Bad("'stream_options' must be an object.", "stream_options");
            if (!stream) throw Bad("'stream_options' is only allowed when 'stream' is true.", "stream_options");
            includeUsage = Bool(so, "include_usage", "stream_options.include_usage") ?? false;
        }
        var temperature = Number(root, "temperature");
        if (temperature is < 0 or > 2) throw Bad($"'temperature' must be between 0 and 2 (got {temperature}).", "temperature");
        var topP = Number(root, "top_p");
        if (topP is <= 0 or > 1) throw Bad($"'top_p' must be in (0, 1] (got {topP}).", "top_p");
        var topK = Int(root, "top_k");
        if (topK is < 0) throw Bad($"'top_k' must be ≥ 0 (got {topK}).", "top_k");
        var rep = Number(root, "repetition_penalty");
        if (rep is < SamplingOptions.MinRepetitionPenalty or > SamplingOptions.MaxRepetitionPenalty)
            throw Bad($"'repetition_penalty' must be between {SamplingOptions.MinRepetitionPenalty} and {SamplingOptions.MaxRepetitionPenalty} (got {rep}).", "repetition_penalty");
        var maxNewTokens = Int(root, "max_completion_tokens") ?? Int(root, "max_tokens");
        long? seed = null;
        if (root.TryGetProperty("seed", out var se) && se.ValueKind != JsonValueKind.Null)
            seed = se.ValueKind == JsonValueKind.Number && se.TryGetInt64(out var sv) ? sv : throw Bad("'seed' must be an integer.", "seed");

        return new ChatCompletionRequest
        {
            Model = model, Messages = messages, Temperature = temperature, TopP = topP, TopK = topK, RepetitionPenalty = rep,
            MaxNewTokens = maxNewTokens, Stop = stop, Seed = seed, Stream = stream, IncludeUsage = includeUsage,
        };
    }

    private static ParsedMessage ParseMessage(JsonElement msg, int index)
    {
        string where = $"messages[{index}]";
        if (msg.ValueKind != JsonValueKind.Object) throw Bad($"{where} must be an object.", where);
        var roleName = msg.TryGetProperty("role", out var r) && r.ValueKind == JsonValueKind.String ? Text(r, $"{where}.role") : throw Bad($"{where}.role is required.", $"{where}.role");
        var role = roleName switch
        {
            "system" or "developer" => ChatRole.System,
            "user" => ChatRole.User,
            "assistant" => ChatRole.Assistant,
            _ => throw Bad($"{where}.role '{Clip(roleName)}' is not supported (system, user, assistant).", $"{where}.role"),
        };
        var parts = new List<object>();
        if (!msg.TryGetProperty("content", out var content) || content.ValueKind == JsonValueKind.Null)
        {
            if (role != ChatRole.Assistant) throw Bad($"{where}.content is required.", $"{where}.content");
        }
        else if (content.ValueKind == JsonValueKind.String) parts.Add(Text(content, $"{where}.content"));
        else if (content.ValueKind == JsonValueKind.Array)
        {
            int j = 0;
            foreach (var part in content.EnumerateArray())
            {
                string pw = $"{where}.content[{j++}]";
                if (part.ValueKind != JsonValueKind.Object || !part.TryGetProperty("type", out var type) || type.ValueKind != JsonValueKind.String)
                    throw Bad($"{pw} must be an object with a 'type'.", pw);
                var typeName = Text(type, pw);
                switch (typeName)
                {
                    case "text":
                        parts.Add(part.TryGetProperty("text", out var t) && t.ValueKind == JsonValueKind.String ? Text(t, pw) : throw Bad($"{pw}.text must be a string.", pw));
                        break;
                    case "image_url":
                        if (role != ChatRole.User) throw Bad($"{pw}: only user messages may hold images.", pw);
                        if (!part.TryGetProperty("image_url", out var iu)) throw Bad($"{pw}.image_url is required.", "image_url");
                        string? url = null, detail = null;
                        if (iu.ValueKind == JsonValueKind.String) url = Text(iu, "image_url");
                        else if (iu.ValueKind == JsonValueKind.Object)
                        {
                            if (iu.TryGetProperty("url", out var u) && u.ValueKind == JsonValueKind.String) url = Text(u, "image_url");
                            if (iu.TryGetProperty("detail", out var d) && d.ValueKind == JsonValueKind.String) detail = Text(d, "image_url");
                        }
                        if (string.IsNullOrEmpty(url)) throw Bad($"{pw}.image_url.url must be a non-empty string.", "image_url");
                        if (detail is not null and not ("auto" or "low" or "high")) throw Bad($"{pw}.image_url.detail must be auto, low or high.", "image_url");
                        parts.Add(new ImagePart(url, detail, pw));
                        break;
                    default:
                        throw Bad($"{pw}: content type '{Clip(typeName!)}' is not supported (text, image_url).", pw);
                }
            }
        }
        else throw Bad($"{where}.content must be a string or an array of content parts.", $"{where}.content");
        return new ParsedMessage(role, parts);
    }

    private static double? Number(JsonElement o, string name)
    {
        if (!o.TryGetProperty(name, out var e) || e.ValueKind == JsonValueKind.Null) return null;
        // A number beyond double's range (1e400) does not parse: as inf it would reach the sampler.
        return e.ValueKind == JsonValueKind.Number && e.TryGetDouble(out var v) && double.IsFinite(v) ? v : throw Bad($"'{name}' must be a finite number.", name);
    }

    private static int? Int(JsonElement o, string name)
    {
        if (!o.TryGetProperty(name, out var e) || e.ValueKind == JsonValueKind.Null) return null;
        return e.ValueKind == JsonValueKind.Number && e.TryGetInt32(out var v) ? v : throw Bad($"'{name}' must be an integer.", name);
    }

    private static bool? Bool(JsonElement o, string name, string? param = null)
    {
        if (!o.TryGetProperty(name, out var e) || e.ValueKind == JsonValueKind.Null) return null;
        return e.ValueKind switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => throw Bad($"'{param ?? name}' must be a boolean.", param ?? name),
        };
    }

    /// <summary>
    /// A string field's text. JSON may escape lone surrogates ("\ud800") that no .NET string can hold, and the reader
    /// leaves invalid UTF-8 inside strings for this call to find: both are the client's fault, named by field.
    /// </summary>
    private static string Text(JsonElement e, string param)
    {
        try { return e.GetString()!; }
        catch (InvalidOperationException) { throw Bad($"'{param}' is not valid Unicode text (invalid UTF-8 or a lone surrogate escape).", param); }
    }

    private static string Clip(string s) => s.Length <= 40 ? s : s[..40] + "…";

    private static ApiException Bad(string message, string? param) => ApiException.BadRequest(message, param);
}
