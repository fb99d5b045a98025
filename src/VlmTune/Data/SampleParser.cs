using System.Text;
using System.Text.Json;
using VlmTune.Text;

namespace VlmTune.Data;

/// <summary>
/// Turns one parsed record into a <see cref="TrainingSample"/>: InternVL chat records (<c>conversations</c>) and
/// OpenAI-style records (<c>messages</c>, XTuner's newer format). Every problem is returned, not thrown, so
/// validation can go on to the next record.
/// </summary>
internal static class SampleParser
{
    /// <summary>XTuner writes one of these in the text where each image goes.</summary>
    private const string XTunerImageToken = "<IMG_CONTEXT>";

    public static DataEntry Parse(JsonElement record, SampleSource source, ImagePaths images, string? dataset, int? maxDynamicPatch)
    {
        try
        {
            if (record.ValueKind != JsonValueKind.Object) throw new RecordError($"expected a JSON object, found {Kind(record)}");
            var id = record.TryGetProperty("id", out var idElement) && idElement.ValueKind != JsonValueKind.Null
                ? (idElement.ValueKind == JsonValueKind.String ? idElement.GetString()! : idElement.GetRawText())
                : $"{Path.GetFileName(source.File)}#{source.Index}";

            List<ConversationTurn> turns;
            List<string> imagePaths;
            if (record.TryGetProperty("conversations", out var conversations))
                (turns, imagePaths) = FromInternVL(record, conversations);
            else if (record.TryGetProperty("messages", out var messages))
                (turns, imagePaths) = FromMessages(messages);
            else
                throw new RecordError("a record needs 'conversations' (InternVL chat format) or 'messages' (OpenAI format)");

            DropLeadingGpt(turns);
            var resolved = new List<string>(imagePaths.Count);
            foreach (var relative in imagePaths)
            {
                var (path, error) = images.Resolve(relative);
                if (error is not null) return DataEntry.Of(new DataProblem(DataProblemKind.PathEscapesRoot, source, error));
                resolved.Add(path!);
            }
            return DataEntry.Of(new TrainingSample(id, resolved, turns, source, dataset, maxDynamicPatch));
        }
        catch (RecordError e)
        {
            return DataEntry.Of(new DataProblem(DataProblemKind.BadRecord, source, e.Message));
        }
        catch (InvalidOperationException e) // System.Text.Json refuses strings such as a lone "\ud83d" escape: not text
        {
            return DataEntry.Of(new DataProblem(DataProblemKind.BadRecord, source, $"a string is not valid text: {e.Message}"));
        }
    }

    /// <summary>InternVL: <c>image</c> is a string, a list, or absent/empty for text-only; turns are from/value.</summary>
    private static (List<ConversationTurn>, List<string>) FromInternVL(JsonElement record, JsonElement conversations)
    {
        if (conversations.ValueKind != JsonValueKind.Array) throw new RecordError($"'conversations' must be a list, found {Kind(conversations)}");
        var turns = new List<ConversationTurn>(conversations.GetArrayLength());
        var i = 0;
        foreach (var turn in conversations.EnumerateArray())
        {
            if (turn.ValueKind != JsonValueKind.Object) throw new RecordError($"conversations[{i}] must be an object, found {Kind(turn)}");
            var from = RequiredString(turn, "from", $"conversations[{i}]");
            var value = RequiredString(turn, "value", $"conversations[{i}]");
            if (from is not (ConversationTurn.Human or ConversationTurn.Gpt or ConversationTurn.System))
                throw new RecordError($"conversations[{i}].from is '{from}'; expected 'human', 'gpt' or 'system'");
            turns.Add(new ConversationTurn(from, value));
            i++;
        }
        if (turns.Count == 0) throw new RecordError("'conversations' is empty");

        var imagePaths = new List<string>();
        var single = false;
        if (record.TryGetProperty("image", out var image))
        {
            switch (image.ValueKind)
            {
                case JsonValueKind.Null: break;
                case JsonValueKind.String:
                    var path = image.GetString()!;
                    if (path.Length > 0) { imagePaths.Add(path); single = true; }
                    break;
                case JsonValueKind.Array:
                    var k = 0;
                    foreach (var item in image.EnumerateArray())
                    {
                        if (item.ValueKind != JsonValueKind.String) throw new RecordError($"image[{k}] must be a path string, found {Kind(item)}");
                        imagePaths.Add(item.GetString()!);
                        k++;
                    }
                    break;
                default: throw new RecordError($"'image' must be a path or a list of paths, found {Kind(image)}");
            }
        }
        if (single)
        {
            // InternVL puts the one image's placeholder in front of the first question when the data leaves it out.
            var first = turns.FindIndex(t => t.From == ConversationTurn.Human);
            if (first >= 0 && !turns[first].Value.Contains(ImagePlaceholders.Placeholder, StringComparison.Ordinal))
                turns[first] = turns[first] with { Value = ImagePlaceholders.Placeholder + "\n" + turns[first].Value };
        }
        return (turns, imagePaths);
    }

    /// <summary>
    /// OpenAI/XTuner: roles system/user/assistant; content a string or a list of text and image_url parts. Where the
    /// text already marks images (XTuner's <c>&lt;IMG_CONTEXT&gt;</c>, or <c>&lt;image&gt;</c>) those marks become
    /// the placeholders; otherwise each image part puts <c>&lt;image&gt;\n</c> where it stands.
    /// </summary>
    private static (List<ConversationTurn>, List<string>) FromMessages(JsonElement messages)
    {
        if (messages.ValueKind != JsonValueKind.Array) throw new RecordError($"'messages' must be a list, found {Kind(messages)}");
        var textMarksImages = false;
        foreach (var message in messages.EnumerateArray())
            if (message.ValueKind == JsonValueKind.Object && message.TryGetProperty("content", out var c))
                foreach (var text in Texts(c))
                    textMarksImages |= text.Contains(XTunerImageToken, StringComparison.Ordinal) ||
                                       text.Contains(ImagePlaceholders.Placeholder, StringComparison.Ordinal);

        var turns = new List<ConversationTurn>();
        var images = new List<string>();
        var i = 0;
        foreach (var message in messages.EnumerateArray())
        {
            var where = $"messages[{i}]";
            if (message.ValueKind != JsonValueKind.Object) throw new RecordError($"{where} must be an object, found {Kind(message)}");
            var role = RequiredString(message, "role", where);
            var from = role switch
            {
                "system" => ConversationTurn.System,
                "user" => ConversationTurn.Human,
                "assistant" => ConversationTurn.Gpt,
                "pretrain" => throw new RecordError($"{where}.role 'pretrain' (XTuner pretraining data) is not supported: VlmTune fine-tunes on chat data with user and assistant turns"),
                _ => throw new RecordError($"{where}.role is '{role}'; expected 'system', 'user' or 'assistant'"),
            };
            if (!message.TryGetProperty("content", out var content)) throw new RecordError($"{where} has no 'content'");
            var value = new StringBuilder();
            if (content.ValueKind == JsonValueKind.String) value.Append(content.GetString());
            else if (content.ValueKind == JsonValueKind.Array)
            {
                var p = 0;
                foreach (var part in content.EnumerateArray())
                {
                    var partWhere = $"{where}.content[{p++}]";
                    if (part.ValueKind != JsonValueKind.Object) throw new RecordError($"{partWhere} must be an object, found {Kind(part)}");
                    var type = RequiredString(part, "type", partWhere);
                    if (type == "text") value.Append(RequiredString(part, "text", partWhere));
                    else if (type == "image_url")
                    {
                        images.Add(ImageUrl(part, partWhere));
                        if (!textMarksImages) value.Append(ImagePlaceholders.Placeholder).Append('\n');
                    }
                    else throw new RecordError($"{partWhere}.type is '{type}'; only 'text' and 'image_url' parts are supported");
                }
            }
            else throw new RecordError($"{where}.content must be a string or a list of parts, found {Kind(content)}");
            turns.Add(new ConversationTurn(from, value.Replace(XTunerImageToken, ImagePlaceholders.Placeholder).ToString()));
            i++;
        }
        if (turns.Count == 0) throw new RecordError("'messages' is empty");
        return (turns, images);
    }

    private static string ImageUrl(JsonElement part, string where)
    {
        if (!part.TryGetProperty("image_url", out var imageUrl)) throw new RecordError($"{where} has no 'image_url'");
        var url = imageUrl.ValueKind switch
        {
            JsonValueKind.String => imageUrl.GetString()!,
            JsonValueKind.Object => RequiredString(imageUrl, "url", $"{where}.image_url"),
            _ => throw new RecordError($"{where}.image_url must be an object with 'url', found {Kind(imageUrl)}"),
        };
        if (url.StartsWith("file://", StringComparison.OrdinalIgnoreCase)) url = url["file://".Length..];
        if (url.StartsWith("data:", StringComparison.OrdinalIgnoreCase) || url.Contains("://", StringComparison.Ordinal))
            throw new RecordError($"{where}.image_url '{Shorten(url)}' is not a local file; save the image under the image root and give its relative path");
        return url;
    }

    private static IEnumerable<string> Texts(JsonElement content)
    {
        if (content.ValueKind == JsonValueKind.String) yield return content.GetString()!;
        else if (content.ValueKind == JsonValueKind.Array)
            foreach (var part in content.EnumerateArray())
                if (part.ValueKind == JsonValueKind.Object && part.TryGetProperty("text", out var t) && t.ValueKind == JsonValueKind.String)
                    yield return t.GetString()!;
    }

    /// <summary>InternVL skips a first gpt turn (after any system turn): there is no question for it to answer.</summary>
    private static void DropLeadingGpt(List<ConversationTurn> turns)
    {
        var first = turns.Count > 0 && turns[0].From == ConversationTurn.System ? 1 : 0;
        if (first < turns.Count && turns[first].From == ConversationTurn.Gpt) turns.RemoveAt(first);
    }

    private static string RequiredString(JsonElement obj, string name, string where)
    {
        if (!obj.TryGetProperty(name, out var value)) throw new RecordError($"{where} has no '{name}'");
        if (value.ValueKind != JsonValueKind.String) throw new RecordError($"{where}.{name} must be a string, found {Kind(value)}");
        return value.GetString()!;
    }

    private static string Kind(JsonElement e) => e.ValueKind switch
    {
        JsonValueKind.Object => "an object",
        JsonValueKind.Array => "a list",
        JsonValueKind.String => "a string",
        JsonValueKind.Number => "a number",
        JsonValueKind.True or JsonValueKind.False => "a boolean",
        _ => "null",
    };

    private static string Shorten(string s) => s.Length <= 60 ? s : s[..57] + "...";

    private sealed class RecordError(string message) : Exception(message);
}
