namespace VlmTune.Text;

/// <summary>
/// The label arithmetic of the official preprocess functions (<c>internvl/train/dataset.py</c>), kept literally: each
/// measures spans with <c>len(tokenizer(piece).input_ids)</c> and fixed offsets tuned to one tokenizer family, so the
/// same offsets are used here on <c>encode</c> = <c>tokenizer(text).input_ids</c> (special tokens added).
/// On another tokenizer family the offsets can be off, as officially; the caller's length check then masks the sample.
/// Each <c>Mask…</c> takes labels that start as a copy of the (possibly cut) ids and returns <c>cur_len</c>, the position
/// after the last learned token, for that check.
/// </summary>
internal static class TrainingLabels
{
    public const int Ignore = ConversationTokenizer.IgnoreTokenId;

    /// <summary>
    /// <c>preprocess_internlm</c>: position 0 (BOS) masked; the text split at the assistant role; the first piece plus
    /// the role masked; in each later piece the reply is kept and <c>user role + question + assistant role</c> masked;
    /// the last reply kept. Every count is <c>len(tokenizer(piece)) - 1</c> (minus the BOS each piece gets).
    /// </summary>
    /// <exception cref="VlmTuneException">A reply holds the user role marker (the official code fails there too).</exception>
    public static int MaskInternLM(string text, int[] labels, ConversationTemplate template, Func<string, int[]> encode)
    {
        int Count(string piece) => encode(piece).Length - 1;
        var cur = 1;
        MaskRange(labels, 0, 1);                                                          // <s>
        var parts = text.Split(template.AssistantRole);
        var length = Count(parts[0] + template.AssistantRole);                           // system + first question + role
        MaskRange(labels, cur, length);
        cur += length;
        for (var i = 1; i < parts.Length - 1; i++)
        {
            // parts[i] = reply <|im_end|> <|im_start|>user\n question <|im_end|>
            var replyAndQuestion = parts[i].Split(template.UserRole);
            if (replyAndQuestion.Length != 2)
                throw new VlmTuneException($"An assistant reply contains the role marker '{template.UserRole.Trim()}' or " +
                                           $"'{template.AssistantRole.Trim()}'; the labels cannot be placed. Remove it from the data.");
            cur += Count(replyAndQuestion[0]);
            length = Count(template.UserRole + replyAndQuestion[1] + template.AssistantRole);
            MaskRange(labels, cur, length);
            cur += length;
        }
        cur += Count(parts[^1]);                                                          // last reply <|im_end|>
        MaskRange(labels, cur, labels.Length - cur);
        return cur;
    }

    /// <summary>
    /// <c>preprocess_mpt</c> (Hermes-2): the text split at the separator and regrouped into rounds (system + first
    /// question + reply, then question + reply); a round spans <c>len(tokenizer(round)) + 1</c> (its separator), of
    /// which the part up to <c>sep + assistant role</c> is masked. Starts at 0: made for tokenizers that add no BOS.
    /// </summary>
    public static int MaskMpt(string text, int[] labels, ConversationTemplate template, Func<string, int[]> encode)
    {
        var cur = 0;
        var replyStart = template.Separator + template.AssistantRole;
        foreach (var round in Rounds(text, template.Separator))
        {
            if (round.Length == 0) break;
            var roundLength = encode(round).Length + 1;
            var parts = round.Split(replyStart);
            if (parts.Length != 2) break;
            MaskRange(labels, cur, encode(parts[0] + replyStart).Length);
            cur += roundLength;
        }
        MaskRange(labels, cur, labels.Length - cur);
        return cur;
    }

    /// <summary>
    /// <c>preprocess_phi3</c>: position 0 and every <c>&lt;|endoftext|&gt;</c> masked, then rounds as
    /// <see cref="MaskMpt"/> with Phi-3's offsets: the first round spans <c>len(tokenizer(round))</c> with
    /// <c>len(tokenizer(instruction)) - 1</c> masked, later rounds <c>len - 1</c> and <c>len - 2</c>.
    /// </summary>
    /// <param name="endOfTextId">Id of <c>&lt;|endoftext|&gt;</c>, when the tokenizer has it.</param>
    public static int MaskPhi3(string text, int[] labels, ConversationTemplate template, Func<string, int[]> encode, int? endOfTextId)
    {
        var cur = 1;
        MaskRange(labels, 0, 1);
        if (endOfTextId is { } endOfText)
            for (var i = 0; i < labels.Length; i++)
                if (labels[i] == endOfText) labels[i] = Ignore;

        var replyStart = template.Separator + template.AssistantRole;
        var index = 0;
        foreach (var round in Rounds(text, template.Separator))
        {
            if (round.Length == 0) break;
            var first = index++ == 0;
            var roundLength = encode(round).Length - (first ? 0 : 1);
            var parts = round.Split(replyStart);
            if (parts.Length != 2) break;
            MaskRange(labels, cur, encode(parts[0] + replyStart).Length - (first ? 1 : 2));
            cur += roundLength;
        }
        MaskRange(labels, cur, labels.Length - cur);
        return cur;
    }

    /// <summary>
    /// <c>preprocess_internvl2_5</c>: each part (system, then every turn) tokenized on its own; when the tokenizer adds
    /// BOS, one BOS goes first and no part keeps its own. System and user parts are masked; of a reply part the
    /// assistant role (<c>len(tokenizer(role))</c> tokens, minus BOS) and the last token (the separator's newline) are
    /// masked, so the reply and its <c>&lt;|im_end|&gt;</c> are learned. Not cut here.
    /// </summary>
    /// <param name="parts">Each part's text and whether it is a reply.</param>
    /// <param name="bosId">The BOS id when the tokenizer adds BOS, else null.</param>
    public static (int[] Ids, int[] Labels) PerTurn(IReadOnlyList<(string Text, bool IsReply)> parts, string assistantRole,
        Func<string, int[]> encode, int? bosId)
    {
        var ids = new List<int>();
        var labels = new List<int>();
        if (bosId is { } bos) { ids.Add(bos); labels.Add(Ignore); }
        var skip = bosId is null ? 0 : 1;
        var roleLength = encode(assistantRole).Length - skip;
        foreach (var (text, isReply) in parts)
        {
            var encoded = encode(text);
            var partIds = encoded[Math.Min(skip, encoded.Length)..];
            var start = labels.Count;
            ids.AddRange(partIds);
            if (!isReply)
            {
                labels.AddRange(Enumerable.Repeat(Ignore, partIds.Length));
                continue;
            }
            labels.AddRange(partIds);
            if (partIds.Length == 0) continue;
            for (var i = start; i < Math.Min(start + roleLength, labels.Count); i++) labels[i] = Ignore;
            labels[^1] = Ignore;
        }
        return ([.. ids], [.. labels]);
    }

    /// <summary>
    /// The rounds of <c>preprocess_mpt</c>/<c>preprocess_phi3</c>: <c>turns = text.split(sep)</c>, then
    /// <c>sep.join(turns[:3])</c> and <c>sep.join(turns[i:i+2])</c> for i = 3, 5, ….
    /// </summary>
    internal static IEnumerable<string> Rounds(string text, string separator)
    {
        var turns = text.Split(separator);
        yield return string.Join(separator, turns.Take(3));
        for (var i = 3; i < turns.Length; i += 2)
            yield return string.Join(separator, turns.Skip(i).Take(2));
    }

    /// <summary>Sets <paramref name="count"/> labels from <paramref name="start"/> to <see cref="Ignore"/>, clipped like a Python slice.</summary>
    internal static void MaskRange(int[] labels, int start, int count)
    {
        var from = Math.Clamp(start, 0, labels.Length);
        var to = Math.Clamp(start + count, from, labels.Length);
        if (to > from) Array.Fill(labels, Ignore, from, to - from);
    }
}
