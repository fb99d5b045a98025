using System.Text.Json.Nodes;
using VlmTune.Tests.Support;
using VlmTune.Text;

namespace VlmTune.Tests.Text;

/// <summary>
/// Variants of the fixture's InternLM2 tokenizer standing in for the other LLM families' tokenizers, each a real
/// tokenizer loaded from files: <see cref="NoBos"/> adds no BOS (as Qwen's and Yi's); <see cref="Phi3Tokens"/> has
/// Phi-3's role tokens as added tokens. Built in temporary folders, deleted afterwards.
/// </summary>
public sealed class TokenizerVariants : IDisposable
{
    private readonly List<string> _dirs = [];

    public TextTokenizer NoBos => _noBos.Value;
    public TextTokenizer Phi3Tokens => _phi3.Value;

    private readonly Lazy<TextTokenizer> _noBos, _phi3;

    public TokenizerVariants()
    {
        _noBos = new(() => Build(config => config["add_bos_token"] = false, []));
        _phi3 = new(() => Build(_ => { }, ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]));
    }

    private TextTokenizer Build(Action<JsonObject> editConfig, string[] extraTokens)
    {
        var dir = Directory.CreateTempSubdirectory("vlmtune-tokenizer-").FullName;
        _dirs.Add(dir);
        foreach (var file in new[] { "tokenizer.model", "special_tokens_map.json" })
            File.Copy(Path.Combine(Fixtures.TinyModel, file), Path.Combine(dir, file));
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.TinyModel, "tokenizer_config.json")))!.AsObject();
        editConfig(config);
        File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), config.ToJsonString());
        var added = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.TinyModel, "added_tokens.json")))!.AsObject();
        var next = 92553;
        foreach (var token in extraTokens) added[token] = next++;
        File.WriteAllText(Path.Combine(dir, "added_tokens.json"), added.ToJsonString());
        return TextTokenizer.Load(dir);
    }

    public void Dispose()
    {
        foreach (var dir in _dirs)
            try { Directory.Delete(dir, recursive: true); } catch (IOException) { }
    }
}

/// <summary>
/// Training labels per template, as the official preprocess function of each (internvl/train/dataset.py): which token
/// ranges of a two-turn conversation are supervised, and the official quirks kept.
/// </summary>
public class TrainingLabelsTests(TokenizerVariants variants) : IClassFixture<TokenizerVariants>
{
    private const int Ignore = ConversationTokenizer.IgnoreTokenId;
    private static TextTokenizer Tokenizer => SentencePieceTokenizerTests.Tokenizer;

    private static ConversationTurn System(string v) => new(ConversationTurn.System, v);
    private static ConversationTurn Human(string v) => new(ConversationTurn.Human, v);
    private static ConversationTurn Gpt(string v) => new(ConversationTurn.Gpt, v);

    private static readonly ConversationTurn[] TwoTurns = [System("S"), Human("Q1"), Gpt("A1"), Human("Q2"), Gpt("A2")];

    /// <summary>Each run of supervised positions: where it starts and its ids, comma-joined (labels equal the ids there).</summary>
    private static List<(int Start, string Ids)> LearnedRuns(TokenizedSample sample)
    {
        var runs = new List<(int, string)>();
        for (var i = 0; i < sample.Labels.Length; i++)
        {
            if (sample.Labels[i] == Ignore) continue;
            var start = i;
            while (i < sample.Labels.Length && sample.Labels[i] != Ignore) i++;
            Assert.Equal(sample.InputIds[start..i], sample.Labels[start..i]);
            runs.Add((start, Ids(sample.InputIds[start..i])));
        }
        return runs;
    }

    /// <summary>
    /// The runs a template should supervise in <see cref="TwoTurns"/>: "A1" + stop token and "A2" + stop token, each
    /// starting where the rendered text before it ends in tokens.
    /// </summary>
    private static List<(int Start, string Ids)> ExpectedReplies(TextTokenizer tokenizer, string text, ConversationTemplate template) =>
        new[] { "A1", "A2" }.Select(reply => (tokenizer.Encode(text[..text.IndexOf(reply, StringComparison.Ordinal)]).Length,
                                      Ids(tokenizer.Encode(reply + template.StopTokens[0], addBos: false)))).ToList();

    private static string Ids(IEnumerable<int> ids) => string.Join(",", ids);

    private TextTokenizer TokenizerFor(string kind) => kind switch
    {
        "bos" => Tokenizer,
        "no-bos" => variants.NoBos,
        _ => throw new ArgumentException(kind),
    };

    /// <summary>Each template with the kind of tokenizer its released checkpoints use (BOS or none).</summary>
    public static TheoryData<string, string> TemplatesWithTheirTokenizers() => new()
    {
        { "internlm2-chat", "bos" },   // InternVL2-2B/8B/26B (InternLM2), InternVL2-Llama3-76B (Llama 3)
        { "Hermes-2", "no-bos" },      // InternVL2-1B (Qwen2), InternVL2-40B (Yi)
        { "internvl2_5", "bos" },      // InternVL2.5-2B/8B/26B (InternLM2.5)
        { "internvl2_5", "no-bos" },   // InternVL2.5/3/3.5 on Qwen2.5 / Qwen3
    };

    [FixtureTheory]
    [MemberData(nameof(TemplatesWithTheirTokenizers))]
    public void TwoTurnsLearnExactlyEachReplyAndItsStopToken(string name, string tokenizerKind)
    {
        var tokenizer = TokenizerFor(tokenizerKind);
        var template = ConversationTemplate.Get(name);
        var conversations = new ConversationTokenizer(tokenizer, template, numImageToken: 4, maxLength: 4096);

        var sample = conversations.Tokenize(TwoTurns, []);
        var text = conversations.Render(TwoTurns, []);

        Assert.Equal(tokenizer.Encode(text), sample.InputIds);        // the whole text, BOS first when the tokenizer adds it
        Assert.Equal(template.Render(
            [new(ConversationRole.User, "Q1"), new(ConversationRole.Assistant, "A1"), new(ConversationRole.User, "Q2"), new(ConversationRole.Assistant, "A2")], "S"), text);
        Assert.False(sample.LabelsMaskedForMismatch);
        Assert.Equal(ExpectedReplies(tokenizer, text, template), LearnedRuns(sample));
    }

    [FixtureFact]
    public void Phi3LearnsEachReplyAndEndWithATokenizerThatPutsALoneSpaceBeforeALeadingSpecialToken()
    {
        // Phi-3's tokenizer (non-legacy Llama sentencepiece) gives BOS + "▁" for a text that starts with an added
        // token such as <|system|>; preprocess_phi3's offsets (-1 / -2) are tuned to that.
        var tokenizer = variants.Phi3Tokens;
        var space = tokenizer.TokenToId("▁");
        int[] Encode(string text) => [tokenizer.BosId!.Value, .. text.StartsWith('<') && tokenizer.AddedTokens.Keys.Any(t => text.StartsWith(t, StringComparison.Ordinal)) ? [space] : Array.Empty<int>(), .. tokenizer.Encode(text, addBos: false)];
        var template = ConversationTemplate.Phi3Chat;
        var text = template.Render(
            [new(ConversationRole.User, "Q1"), new(ConversationRole.Assistant, "A1"), new(ConversationRole.User, "Q2"), new(ConversationRole.Assistant, "A2")], "S");
        var ids = Encode(text);
        var labels = (int[])ids.Clone();

        var learnedEnd = TrainingLabels.MaskPhi3(text, labels, template, Encode, tokenizer.TokenToId("<|endoftext|>"));

        Assert.Equal(ids.Length, learnedEnd);                          // no mismatch: the official check passes
        var sample = new TokenizedSample(ids, labels, ids.Length, false);
        var expected = new[] { "A1", "A2" }.Select(r => (Encode(text[..text.IndexOf(r, StringComparison.Ordinal)]).Length,
                                                         Ids(tokenizer.Encode(r + "<|end|>", addBos: false)))).ToList();
        Assert.Equal(expected, LearnedRuns(sample));
        Assert.Equal(space, ids[1]);
        Assert.Equal(Ignore, labels[1]);
    }

    [FixtureFact]
    public void Phi3MasksEndOfTextTokensAndOnATokenizerWithoutPhi3sQuirkOnlySingleTurnsFit()
    {
        var tokenizer = variants.Phi3Tokens;
        var conversations = new ConversationTokenizer(tokenizer, ConversationTemplate.Phi3Chat, numImageToken: 4, maxLength: 4096);

        var single = conversations.Tokenize([Human("Q"), Gpt("a<|endoftext|>b")], []);
        Assert.False(single.LabelsMaskedForMismatch);
        var endOfText = Array.IndexOf(single.InputIds, tokenizer.TokenToId("<|endoftext|>"));
        Assert.Equal(Ignore, single.Labels[endOfText]);                // official: every <|endoftext|> is masked
        Assert.Equal(tokenizer.Encode("a<|endoftext|>b<|end|>", addBos: false).Where(id => id != single.InputIds[endOfText]),
            single.Labels.Where(l => l != Ignore));

        // Without the "▁" of Phi-3's tokenizer each later round is one token short: the official length check masks all.
        var two = conversations.Tokenize(TwoTurns, []);
        Assert.True(two.LabelsMaskedForMismatch);
        Assert.Equal(0, two.SupervisedTokenCount);
    }

    [FixtureFact]
    public void HermesOnATokenizerWithBosFitsOneTurnButNotTwoAsOfficially()
    {
        // preprocess_mpt counts no BOS: the first round's own BOS stands in for the real one, later rounds overcount.
        var conversations = new ConversationTokenizer(Tokenizer, ConversationTemplate.Hermes2, numImageToken: 4, maxLength: 4096);
        var one = conversations.Tokenize([Human("Q"), Gpt("A")], []);
        Assert.False(one.LabelsMaskedForMismatch);
        Assert.Equal(Tokenizer.Encode("A<|im_end|>", addBos: false), one.Labels.Where(l => l != Ignore));
        Assert.Equal(Ignore, one.Labels[0]);

        var two = conversations.Tokenize(TwoTurns, []);
        Assert.True(two.LabelsMaskedForMismatch);
    }

    [FixtureFact]
    public void InternVL25TokenizesTurnByTurnAndKeepsValuesAsWritten()
    {
        var conversations = new ConversationTokenizer(Tokenizer, ConversationTemplate.InternVL25, numImageToken: 4, maxLength: 4096);
        ConversationTurn[] turns = [System(" S "), Human(" Q "), Gpt(" A\n")];
        var sample = conversations.Tokenize(turns, []);

        var parts = new[] { "<|im_start|>system\n S <|im_end|>\n", "<|im_start|>user\n Q <|im_end|>\n", "<|im_start|>assistant\n A\n<|im_end|>\n" };
        Assert.Equal(string.Concat(parts), conversations.Render(turns, []));
        Assert.Equal([Tokenizer.BosId!.Value, .. parts.SelectMany(p => Tokenizer.Encode(p, addBos: false))], sample.InputIds);
        Assert.Equal(Tokenizer.Encode(" A\n<|im_end|>", addBos: false), sample.Labels.Where(l => l != Ignore));
        Assert.Equal(Ignore, sample.Labels[^1]);                        // the newline after <|im_end|>

        // internlm2-chat strips them (preprocess_internlm).
        var internlm = new ConversationTokenizer(Tokenizer, ConversationTemplate.InternLM2Chat, numImageToken: 4, maxLength: 4096);
        Assert.StartsWith("<|im_start|>system\nS<|im_end|><|im_start|>user\nQ<|im_end|>", internlm.Render(turns, []));
    }

    [FixtureFact]
    public void InternVL25HasNoMismatchCheckAndExpandsImagesInQuestionsOnly()
    {
        var conversations = new ConversationTokenizer(Tokenizer, ConversationTemplate.InternVL25, numImageToken: 2, maxLength: 4096);
        // "</s>" (the pad id) in a reply masks everything in preprocess_internlm, not here.
        var pad = conversations.Tokenize([Human("Hi"), Gpt("a</s>b")], []);
        Assert.False(pad.LabelsMaskedForMismatch);
        Assert.Contains(Tokenizer.EosId, pad.Labels);

        // A placeholder in a reply stays text (official: only human turns are expanded).
        var sample = conversations.Tokenize([Human("<image>\nWhat?"), Gpt("It says <image>.")], [1]);
        Assert.Equal(2, sample.InputIds.Count(id => id == Tokenizer.ImgContextId));
        Assert.Contains("It says <image>.<|im_end|>", conversations.Render([Human("<image>\nWhat?"), Gpt("It says <image>.")], [1]));
        var e = Assert.Throws<VlmTuneException>(() => new ConversationTokenizer(Tokenizer, ConversationTemplate.InternLM2Chat, 2, 4096)
            .Tokenize([Human("<image>\nWhat?"), Gpt("It says <image>.")], [1], "line 4"));
        Assert.Contains("line 4 has 2 '<image>' placeholder(s) but 1 image(s)", e.Message);

        var missing = Assert.Throws<VlmTuneException>(() => conversations.Tokenize([Human("no image"), Gpt("x"), Human("<image>"), Gpt("y")], [1, 1], "line 5"));
        Assert.Contains("line 5 (its human turns) has 1 '<image>' placeholder(s) but 2 image(s)", missing.Message);
    }

    [FixtureFact]
    public void InternVL25RefusesALeadingReplyThatOtherTemplatesDrop()
    {
        ConversationTurn[] turns = [Gpt("greeting"), Human("Hi"), Gpt("Hello")];
        var e = Assert.Throws<VlmTuneException>(() =>
            new ConversationTokenizer(Tokenizer, ConversationTemplate.InternVL25, 4, 4096).Tokenize(turns, [], "line 9"));
        Assert.Contains("line 9", e.Message);
        Assert.Contains("starts with a 'gpt' turn", e.Message);
        Assert.DoesNotContain("greeting", new ConversationTokenizer(Tokenizer, ConversationTemplate.Hermes2, 4, 4096).Render(turns, []));
    }

    [FixtureFact]
    public void InternVL25CutsIdsAndLabelsTogetherButNeverImageTokens()
    {
        ConversationTurn[] turns = [Human("<image>\nQ"), Gpt(string.Join(" ", Enumerable.Repeat("word", 40)))];
        var full = new ConversationTokenizer(Tokenizer, ConversationTemplate.InternVL25, 4, 4096).Tokenize(turns, [1]);
        var cut = new ConversationTokenizer(Tokenizer, ConversationTemplate.InternVL25, 4, full.InputIds.Length - 10).Tokenize(turns, [1]);
        Assert.True(cut.Truncated);
        Assert.Equal(full.InputIds[..cut.InputIds.Length], cut.InputIds);
        Assert.Equal(full.Labels[..cut.Labels.Length], cut.Labels);
        Assert.False(cut.LabelsMaskedForMismatch);

        var imageEnd = Array.IndexOf(full.InputIds, Tokenizer.ImgEndId);
        Assert.Throws<ImageTokensTruncatedException>(() => new ConversationTokenizer(Tokenizer, ConversationTemplate.InternVL25, 4, imageEnd).Tokenize(turns, [1]));
    }

    [Fact]
    public void RoundsRegroupTheSeparatedTextAsPreprocessMpt()
    {
        Assert.Equal(["s|u1|a1", "u2|a2", ""], TrainingLabels.Rounds("s|u1|a1|u2|a2|", "|"));
        Assert.Equal(["s|u1|a1", ""], TrainingLabels.Rounds("s|u1|a1|", "|"));
    }
}
