namespace VlmTune.Text;

/// <summary>One turn of a training conversation (InternVL's <c>{"from": "human"|"gpt", "value": ...}</c>).</summary>
/// <param name="From"><c>human</c> or <c>gpt</c>; a first turn <c>system</c> replaces the system message.</param>
public sealed record ConversationTurn(string From, string Value)
{
    public const string Human = "human";
    public const string Gpt = "gpt";
    public const string System = "system";
}

/// <summary>A tokenized training sample.</summary>
/// <param name="InputIds">Token ids, BOS first, at most the maximum length.</param>
/// <param name="Labels">Per position: the id to learn, or <see cref="ConversationTokenizer.IgnoreTokenId"/>.</param>
/// <param name="FullLength">Length before truncation.</param>
/// <param name="LabelsMaskedForMismatch">
/// All labels were masked because the per-part token counts did not add up to the whole (the official code does this
/// and prints a "tokenization mismatch" warning): the sample teaches nothing.
/// </param>
public sealed record TokenizedSample(int[] InputIds, int[] Labels, int FullLength, bool LabelsMaskedForMismatch)
{
    /// <summary>The sample was cut to the maximum length (text only; a cut image raises <see cref="ImageTokensTruncatedException"/>).</summary>
    public bool Truncated => FullLength > InputIds.Length;

    /// <summary>Number of positions with a label.</summary>
    public int SupervisedTokenCount => Labels.Count(l => l != ConversationTokenizer.IgnoreTokenId);
}

/// <summary>
/// A sample is longer than the maximum length and the cut would fall in (or after) an image's token run: the image
/// features would no longer match the image tokens. The trainer drops and counts such samples.
/// </summary>
public sealed class ImageTokensTruncatedException(int length, int maxLength, string message) : VlmTuneException(message)
{
    public int Length { get; } = length;
    public int MaxLength { get; } = maxLength;
}

/// <summary>
/// Tokenizes training conversations as InternVL's <c>preprocess_internlm</c> (<c>internvl/train/dataset.py</c>), for the
/// <c>internlm2-chat</c> template:
/// <list type="number">
/// <item>a leading <c>gpt</c> turn is dropped; turns must alternate human/gpt; every value is stripped of surrounding whitespace;</item>
/// <item>the template renders the conversation (system message first); each <c>&lt;image&gt;</c> in order becomes
/// <c>&lt;img&gt;</c> + <c>&lt;IMG_CONTEXT&gt;</c> × num_image_token × tiles + <c>&lt;/img&gt;</c>;</item>
/// <item>the text is tokenized (BOS first) and cut to the maximum length;</item>
/// <item>labels copy the ids, then BOS, the system prompt and every <c>&lt;|im_start|&gt;user\n…&lt;|im_end|&gt;&lt;|im_start|&gt;assistant\n</c>
/// are masked with -100: only the assistant replies and their <c>&lt;|im_end|&gt;</c> are learned. The masked spans are
/// measured by tokenizing the text pieces between the assistant role markers separately, as the official code does; if
/// those counts do not add up to the whole, every label is masked (<see cref="TokenizedSample.LabelsMaskedForMismatch"/>).</item>
/// </list>
/// Differences from the official code, all on inputs it would mis-handle: a placeholder count that differs from the image
/// count is an error (it would leave literal <c>&lt;image&gt;</c> text or fail an assertion); a cut through image tokens
/// raises <see cref="ImageTokensTruncatedException"/>; a conversation must end with a gpt turn (else the last question
/// would be learned); a first <c>system</c> turn sets the system message.
/// </summary>
public sealed class ConversationTokenizer
{
    /// <summary>Label of positions that are not learned (PyTorch's cross-entropy <c>ignore_index</c>).</summary>
    public const int IgnoreTokenId = -100;

    private readonly TextTokenizer _tokenizer;

    public ConversationTemplate Template { get; }
    public int NumImageToken { get; }
    public int MaxLength { get; }

    /// <param name="numImageToken">Tokens per image tile (256 for InternVL2).</param>
    /// <param name="maxLength">The official <c>model_max_length</c> (4096 in tokenizer_config.json; InternVL2 fine-tunes use 4096 too).</param>
    public ConversationTokenizer(TextTokenizer tokenizer, ConversationTemplate template, int numImageToken, int maxLength)
    {
        _tokenizer = tokenizer ?? throw new ArgumentNullException(nameof(tokenizer));
        Template = template ?? throw new ArgumentNullException(nameof(template));
        if (numImageToken <= 0) throw new VlmTuneException($"num_image_token is {numImageToken}; it must be positive.");
        if (maxLength <= 1) throw new VlmTuneException($"The maximum sample length is {maxLength}; it must be at least 2.");
        NumImageToken = numImageToken;
        MaxLength = maxLength;
    }

    /// <summary>Input ids and labels of one conversation.</summary>
    /// <param name="conversation">The turns (human, gpt, human, gpt, ...).</param>
    /// <param name="imageTiles">Tiles of each image of the sample, in placeholder order; empty for a text-only sample.</param>
    /// <param name="where">Names the sample in error messages (e.g. "data.jsonl line 12").</param>
    /// <exception cref="VlmTuneException">The conversation is malformed, or placeholders and images do not match.</exception>
    /// <exception cref="ImageTokensTruncatedException">The maximum length would cut image tokens.</exception>
    public TokenizedSample Tokenize(IReadOnlyList<ConversationTurn> conversation, IReadOnlyList<int> imageTiles, string where = "the sample")
    {
        var text = Render(conversation, imageTiles, where);
        var fullIds = _tokenizer.Encode(text);

        if (fullIds.Length > MaxLength)
            for (var i = MaxLength; i < fullIds.Length; i++)
                if (IsImageToken(fullIds[i]))
                    throw new ImageTokensTruncatedException(fullIds.Length, MaxLength,
                        $"{where} has {fullIds.Length} tokens, more than the maximum length {MaxLength}, and the cut would fall " +
                        $"inside its image tokens (token {i}); drop the sample, use fewer tiles, or raise the maximum length.");

        var ids = fullIds.Length > MaxLength ? fullIds[..MaxLength] : fullIds;
        var labels = (int[])ids.Clone();
        var learnedEnd = MaskPrompts(text, labels);

        var mismatch = false;
        if (learnedEnd < MaxLength)   // as the official code: only checked when the sample was not cut
        {
            var total = ids.Count(id => id != _tokenizer.PadId);   // official: tokens that are not pad (= EOS for InternLM2)
            if (learnedEnd != total)
            {
                Array.Fill(labels, IgnoreTokenId);
                mismatch = true;
            }
        }
        return new TokenizedSample(ids, labels, fullIds.Length, mismatch);
    }

    /// <summary>The conversation as text, image tokens expanded (what <see cref="Tokenize"/> tokenizes).</summary>
    public string Render(IReadOnlyList<ConversationTurn> conversation, IReadOnlyList<int> imageTiles, string where = "the sample")
    {
        ArgumentNullException.ThrowIfNull(conversation);
        ArgumentNullException.ThrowIfNull(imageTiles);
        var (systemMessage, messages) = ToMessages(conversation, imageTiles.Count, where);
        var text = Template.Render(messages, systemMessage);
        return ImagePlaceholders.Expand(text, imageTiles, NumImageToken, where);
    }

    /// <summary>
    /// Masks BOS, the system prompt and the user parts of <paramref name="labels"/> the way <c>preprocess_internlm</c>
    /// does: split the text at the assistant role, count the tokens of each piece tokenized on its own. Returns the
    /// position after the last learned token (<c>cur_len</c>).
    /// </summary>
    private int MaskPrompts(string text, int[] labels)
    {
        var position = 0;
        void Mask(int count) { MaskRange(labels, position, count); position += count; }
        void Keep(int count) => position += count;
        int Count(string piece) => _tokenizer.CountTokens(piece, addBos: false);

        Mask(_tokenizer.AddBosToken ? 1 : 0);                                       // <s>
        var parts = text.Split(Template.AssistantRole);
        Mask(Count(parts[0] + Template.AssistantRole));                              // system + first question + assistant role
        for (var i = 1; i < parts.Length - 1; i++)
        {
            // parts[i] = reply <|im_end|> <|im_start|>user\n question <|im_end|>
            var replyAndQuestion = parts[i].Split(Template.UserRole);
            if (replyAndQuestion.Length != 2)
                throw new VlmTuneException($"An assistant reply contains the role marker '{Template.UserRole.Trim()}' or " +
                                           $"'{Template.AssistantRole.Trim()}'; the labels cannot be placed. Remove it from the data.");
            Keep(Count(replyAndQuestion[0]));
            Mask(Count(Template.UserRole + replyAndQuestion[1] + Template.AssistantRole));
        }
        Keep(Count(parts[^1]));                                                      // last reply <|im_end|>
        MaskRange(labels, position, labels.Length - position);
        return position;
    }

    private static void MaskRange(int[] labels, int start, int count)
    {
        var from = Math.Min(start, labels.Length);
        var to = Math.Min(start + count, labels.Length);
        if (to > from) Array.Fill(labels, IgnoreTokenId, from, to - from);
    }

    private bool IsImageToken(int id) => id == _tokenizer.ImgContextId || id == _tokenizer.ImgStartId || id == _tokenizer.ImgEndId;

    /// <summary>Validates the turns and turns them into template messages; reports every problem at once.</summary>
    private (string? SystemMessage, List<ConversationMessage> Messages) ToMessages(IReadOnlyList<ConversationTurn> conversation,
        int imageCount, string where)
    {
        var problems = new List<string>();
        var turns = conversation.ToList();
        string? systemMessage = null;
        if (turns.Count > 0 && turns[0]?.From == ConversationTurn.System)
        {
            systemMessage = PythonStrip(turns[0].Value ?? "");
            turns.RemoveAt(0);
        }
        if (turns.Count > 0 && turns[0]?.From == ConversationTurn.Gpt) turns.RemoveAt(0);   // official: skip a leading gpt turn

        // Official single-image datasets put "<image>\n" before the first question when it has no placeholder.
        if (imageCount == 1 && turns.Count > 0 && turns[0]?.Value is { } first && !first.Contains(ImagePlaceholders.Placeholder, StringComparison.Ordinal))
            turns[0] = turns[0] with { Value = ImagePlaceholders.Placeholder + "\n" + first };

        var messages = new List<ConversationMessage>(turns.Count);
        for (var i = 0; i < turns.Count; i++)
        {
            var turn = turns[i];
            var expected = i % 2 == 0 ? ConversationTurn.Human : ConversationTurn.Gpt;
            if (turn is null) { problems.Add($"turn {i} is null"); continue; }
            if (turn.From != expected)
                problems.Add($"turn {i} is from '{turn.From}' but turns must alternate '{ConversationTurn.Human}'/'{ConversationTurn.Gpt}' (expected '{expected}')");
            if (turn.Value is null) problems.Add($"turn {i} has no value");
            messages.Add(new ConversationMessage(i % 2 == 0 ? ConversationRole.User : ConversationRole.Assistant, PythonStrip(turn.Value ?? "")));
        }
        if (turns.Count == 0) problems.Add("it has no human/gpt turns");
        else if (turns.Count % 2 != 0 || turns[^1]?.From != ConversationTurn.Gpt)
            problems.Add($"it ends with a '{turns[^1]?.From}' turn; the last turn must be the '{ConversationTurn.Gpt}' reply to learn");

        if (problems.Count > 0) throw new VlmTuneException($"Invalid conversation in {where}: {string.Join("; ", problems)}.");
        return (systemMessage, messages);
    }

    /// <summary>Python's <c>str.strip()</c>: .NET's white space plus U+001C..U+001F, which Python also strips.</summary>
    internal static string PythonStrip(string s)
    {
        static bool IsPythonSpace(char c) => char.IsWhiteSpace(c) || c is >= '\u001C' and <= '\u001F';
        var start = 0;
        var end = s.Length;
        while (start < end && IsPythonSpace(s[start])) start++;
        while (end > start && IsPythonSpace(s[end - 1])) end--;
        return s[start..end];
    }
}
