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
/// Tokenizes training conversations as the official fine-tune script does for the model's template
/// (<see cref="ConversationTemplate.Labels"/>; InternVL's <c>internvl/train/dataset.py</c>):
/// <list type="bullet">
/// <item><b>internlm2-chat</b> (<c>preprocess_internlm</c>): values stripped; the template renders the conversation
/// (system message first); each <c>&lt;image&gt;</c> in order becomes <c>&lt;img&gt;</c> + <c>&lt;IMG_CONTEXT&gt;</c> ×
/// num_image_token × tiles + <c>&lt;/img&gt;</c>; the text is tokenized (BOS first) and cut to the maximum length; BOS, the
/// system prompt and every <c>user role…&lt;|im_end|&gt;assistant role</c> are masked with -100, so each reply and its
/// <c>&lt;|im_end|&gt;</c> are learned. The spans are measured by tokenizing the pieces between the assistant roles
/// separately; if those counts do not add up to the whole, every label is masked
/// (<see cref="TokenizedSample.LabelsMaskedForMismatch"/>).</item>
/// <item><b>Hermes-2</b> (<c>preprocess_mpt</c>) and <b>phi3-chat</b> (<c>preprocess_phi3</c>): the same, but values are
/// not stripped and the spans are measured per round (question + reply) with those functions' offsets.</item>
/// <item><b>internvl2_5</b> (<c>preprocess_internvl2_5</c>): values not stripped; the images expand in the human turns
/// only; the system prompt and every turn (<c>role + value + sep</c>) are tokenized one by one (one BOS first when the
/// tokenizer adds it) and concatenated; system and questions masked, of each reply its role and final newline masked;
/// then cut. No mismatch check.</item>
/// </list>
/// A leading <c>gpt</c> turn is dropped (as officially) except for internvl2_5, which would learn it; there it is an
/// error. Other differences from the official code, all on inputs it would mis-handle: turns must alternate human/gpt
/// and end with a gpt turn (else the last question would be learned); a placeholder count that differs from the image
/// count is an error (it would leave literal <c>&lt;image&gt;</c> text or fail an assertion); a cut through image tokens
/// raises <see cref="ImageTokensTruncatedException"/> (the official script asserts on the <c>&lt;/img&gt;</c> count); a
/// single-image sample without a placeholder gets <c>"&lt;image&gt;\n"</c> before its first question (officially before the
/// first turn, even a system one); a first
/// <c>system</c> turn sets the system message (only internvl2_5 reads one officially).
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

    /// <summary>HF's <c>tokenizer(text).input_ids</c>: special tokens (BOS) added as the tokenizer does.</summary>
    private int[] Encode(string text) => _tokenizer.Encode(text);

    /// <summary>Input ids and labels of one conversation.</summary>
    /// <param name="conversation">The turns (human, gpt, human, gpt, ...).</param>
    /// <param name="imageTiles">Tiles of each image of the sample, in placeholder order; empty for a text-only sample.</param>
    /// <param name="where">Names the sample in error messages (e.g. "data.jsonl line 12").</param>
    /// <exception cref="VlmTuneException">The conversation is malformed, or placeholders and images do not match.</exception>
    /// <exception cref="ImageTokensTruncatedException">The maximum length would cut image tokens.</exception>
    public TokenizedSample Tokenize(IReadOnlyList<ConversationTurn> conversation, IReadOnlyList<int> imageTiles, string where = "the sample")
    {
        ArgumentNullException.ThrowIfNull(conversation);
        ArgumentNullException.ThrowIfNull(imageTiles);
        var (systemMessage, messages) = ToMessages(conversation, imageTiles.Count, where);

        if (Template.Labels == TrainingLabelStyle.InternVL25)
        {
            var parts = PerTurnParts(systemMessage, messages, imageTiles, where);
            var (allIds, allLabels) = TrainingLabels.PerTurn(parts, Template.AssistantRole, Encode,
                _tokenizer.AddBosToken ? _tokenizer.BosId : null);
            CheckImageCut(allIds, where);
            return new TokenizedSample(Cut(allIds), Cut(allLabels), allIds.Length, LabelsMaskedForMismatch: false);
        }

        var text = ImagePlaceholders.Expand(Template.Render(messages, systemMessage), imageTiles, NumImageToken, where);
        var fullIds = Encode(text);
        CheckImageCut(fullIds, where);
        var ids = Cut(fullIds);
        var labels = (int[])ids.Clone();
        var learnedEnd = Template.Labels switch
        {
            TrainingLabelStyle.InternLM => TrainingLabels.MaskInternLM(text, labels, Template, Encode),
            TrainingLabelStyle.Mpt => TrainingLabels.MaskMpt(text, labels, Template, Encode),
            TrainingLabelStyle.Phi3 => TrainingLabels.MaskPhi3(text, labels, Template, Encode,
                _tokenizer.TryTokenToId("<|endoftext|>", out var endOfText) ? endOfText : null),
            var style => throw new VlmTuneException($"Conversation template '{Template.Name}': unknown training label style {style}."),
        };

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

    /// <summary>The conversation as text, image tokens expanded (what <see cref="Tokenize"/> tokenizes, as one text or turn by turn).</summary>
    public string Render(IReadOnlyList<ConversationTurn> conversation, IReadOnlyList<int> imageTiles, string where = "the sample")
    {
        ArgumentNullException.ThrowIfNull(conversation);
        ArgumentNullException.ThrowIfNull(imageTiles);
        var (systemMessage, messages) = ToMessages(conversation, imageTiles.Count, where);
        if (Template.Labels == TrainingLabelStyle.InternVL25)
            return string.Concat(PerTurnParts(systemMessage, messages, imageTiles, where).Select(p => p.Text));
        return ImagePlaceholders.Expand(Template.Render(messages, systemMessage), imageTiles, NumImageToken, where);
    }

    private int[] Cut(int[] values) => values.Length > MaxLength ? values[..MaxLength] : values;

    /// <summary>A cut at <see cref="MaxLength"/> must not fall in or before an image's token run.</summary>
    private void CheckImageCut(int[] fullIds, string where)
    {
        for (var i = MaxLength; i < fullIds.Length; i++)
            if (IsImageToken(fullIds[i]))
                throw new ImageTokensTruncatedException(fullIds.Length, MaxLength,
                    $"{where} has {fullIds.Length} tokens, more than the maximum length {MaxLength}, and the cut would fall " +
                    $"inside its image tokens (token {i}); drop the sample, use fewer tiles, or raise the maximum length.");
    }

    /// <summary>
    /// The parts <c>preprocess_internvl2_5</c> tokenizes one by one: the system prompt, then <c>role + value + sep</c>
    /// per turn (even an empty value keeps its separator), the images expanded in the questions only.
    /// </summary>
    private List<(string Text, bool IsReply)> PerTurnParts(string? systemMessage, List<ConversationMessage> messages,
        IReadOnlyList<int> imageTiles, string where)
    {
        var questions = messages.Where(m => m.Role == ConversationRole.User).Select(m => m.Text ?? "").ToList();
        ImagePlaceholders.Validate(questions.Sum(ImagePlaceholders.Count), imageTiles, NumImageToken, $"{where} (its human turns)");
        var parts = new List<(string, bool)>(messages.Count + 1) { (Template.RenderSystem(systemMessage), false) };
        var image = 0;
        foreach (var message in messages)
        {
            var value = message.Text ?? "";
            if (message.Role == ConversationRole.User)
            {
                var count = ImagePlaceholders.Count(value);
                value = ImagePlaceholders.Expand(value, imageTiles.Skip(image).Take(count).ToList(), NumImageToken, where);
                image += count;
            }
            parts.Add((Template.RolePrefix(message.Role) + value + Template.Separator, message.Role == ConversationRole.Assistant));
        }
        return parts;
    }

    private bool IsImageToken(int id) => id == _tokenizer.ImgContextId || id == _tokenizer.ImgStartId || id == _tokenizer.ImgEndId;

    /// <summary>Validates the turns and turns them into template messages; reports every problem at once.</summary>
    private (string? SystemMessage, List<ConversationMessage> Messages) ToMessages(IReadOnlyList<ConversationTurn> conversation,
        int imageCount, string where)
    {
        // Only preprocess_internlm strips the values; internvl2_5 keeps (and learns) a leading reply, which is refused here.
        var strip = Template.Labels == TrainingLabelStyle.InternLM;
        string Value(string? value) => strip ? PythonStrip(value ?? "") : value ?? "";
        var problems = new List<string>();
        var turns = conversation.ToList();
        string? systemMessage = null;
        if (turns.Count > 0 && turns[0]?.From == ConversationTurn.System)
        {
            systemMessage = Value(turns[0].Value);
            turns.RemoveAt(0);
        }
        if (turns.Count > 0 && turns[0]?.From == ConversationTurn.Gpt)
        {
            if (Template.Labels == TrainingLabelStyle.InternVL25)
                problems.Add($"it starts with a '{ConversationTurn.Gpt}' turn, which the {Template.Name} preprocessing would learn as a reply to nothing; remove it or put the question before it");
            else turns.RemoveAt(0);   // official: skip a leading gpt turn
        }

        // Official single-image datasets put "<image>\n" before the first question when it has no placeholder.
        if (imageCount == 1 && turns.Count > 0 && turns[0]?.From == ConversationTurn.Human && turns[0].Value is { } first &&
            !first.Contains(ImagePlaceholders.Placeholder, StringComparison.Ordinal))
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
            messages.Add(new ConversationMessage(i % 2 == 0 ? ConversationRole.User : ConversationRole.Assistant, Value(turn.Value)));
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
