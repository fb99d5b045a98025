namespace VlmTune.Text;

/// <summary>One earlier exchange of a chat: the user's question and the assistant's answer.</summary>
public readonly record struct ChatTurn(string User, string Assistant);

/// <summary>
/// A generation prompt built as InternVL's <c>model.chat()</c> / <c>batch_chat()</c> build it:
/// <list type="number">
/// <item>with images, no history, and no <c>&lt;image&gt;</c> in the question: <c>"&lt;image&gt;\n"</c> is put before the question;</item>
/// <item>the template renders system message, history and question, ending with the assistant role;</item>
/// <item>every <c>&lt;image&gt;</c> of that text (history included), in order, becomes the image's token run
/// (<see cref="ImagePlaceholders.Expand"/>); their number must equal the number of images;</item>
/// <item>the text is tokenized with BOS.</item>
/// </list>
/// </summary>
/// <param name="Text">The prompt with image tokens expanded.</param>
/// <param name="InputIds">Its token ids (BOS first).</param>
public sealed record ChatPrompt(string Text, int[] InputIds)
{
    /// <summary>Builds the prompt text and ids.</summary>
    /// <param name="imageTiles">Tiles of each image (thumbnail included), in placeholder order; empty for text only.</param>
    /// <param name="numImageToken">Tokens per tile (256 for InternVL2, see <see cref="ImagePlaceholders.NumImageToken"/>).</param>
    /// <param name="history">Earlier exchanges, oldest first.</param>
    /// <param name="systemMessage">Overrides the template's system message (the model's <c>system_message</c>).</param>
    public static ChatPrompt Build(TextTokenizer tokenizer, ConversationTemplate template, string question,
        IReadOnlyList<int> imageTiles, int numImageToken, IReadOnlyList<ChatTurn>? history = null, string? systemMessage = null)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        var text = BuildText(template, question, imageTiles, numImageToken, history, systemMessage);
        return new ChatPrompt(text, tokenizer.Encode(text));
    }

    /// <summary>The prompt text alone (see <see cref="Build"/>).</summary>
    public static string BuildText(ConversationTemplate template, string question, IReadOnlyList<int> imageTiles,
        int numImageToken, IReadOnlyList<ChatTurn>? history = null, string? systemMessage = null)
    {
        ArgumentNullException.ThrowIfNull(template);
        ArgumentNullException.ThrowIfNull(question);
        ArgumentNullException.ThrowIfNull(imageTiles);
        history ??= [];

        if (imageTiles.Count > 0 && history.Count == 0 && !question.Contains(ImagePlaceholders.Placeholder, StringComparison.Ordinal))
            question = ImagePlaceholders.Placeholder + "\n" + question;

        var messages = new List<ConversationMessage>(2 * history.Count + 2);
        foreach (var turn in history)
        {
            messages.Add(new ConversationMessage(ConversationRole.User, turn.User));
            messages.Add(new ConversationMessage(ConversationRole.Assistant, turn.Assistant));
        }
        messages.Add(new ConversationMessage(ConversationRole.User, question));
        messages.Add(new ConversationMessage(ConversationRole.Assistant, null));

        var prompt = template.Render(messages, systemMessage);
        return ImagePlaceholders.Expand(prompt, imageTiles, numImageToken, "the chat prompt (system message, history and question)");
    }
}
