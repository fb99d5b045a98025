using VlmTune.Models;
using VlmTune.Text;

namespace VlmTune.Data;

/// <summary>
/// Exact training lengths: the conversation rendered by the model's template and tokenized as
/// <see cref="ConversationTokenizer"/> does for training, image tokens included.
/// </summary>
public sealed class TrainingLength : ISampleLengthCounter
{
    private readonly TextTokenizer _tokenizer;
    private readonly ConversationTokenizer _conversations;

    public TrainingLength(TextTokenizer tokenizer, ConversationTemplate template, int numImageToken)
    {
        _tokenizer = tokenizer;
        // The maximum length only matters for cutting, which is not done here.
        _conversations = new ConversationTokenizer(tokenizer, template, numImageToken, maxLength: int.MaxValue);
    }

    public TextTokenizer Tokenizer => _tokenizer;

    /// <summary>The sample tokenized as training tokenizes it, cut at <paramref name="maxLength"/>: ids, labels, full length.</summary>
    public TokenizedSample Tokenize(IReadOnlyList<ConversationTurn> conversation, IReadOnlyList<int> imageTiles, int maxLength, string where) =>
        new ConversationTokenizer(_tokenizer, _conversations.Template, _conversations.NumImageToken, maxLength).Tokenize(conversation, imageTiles, where);

    public int NumImageToken => _conversations.NumImageToken;

    public int Count(IReadOnlyList<ConversationTurn> conversation, IReadOnlyList<int> imageTiles)
    {
        // Render with one tile per image and add the rest arithmetically: the same count as rendering every
        // <IMG_CONTEXT> (they are single added tokens) without building strings of thousands of them.
        var ones = Enumerable.Repeat(1, imageTiles.Count).ToArray();
        var text = _conversations.Render(conversation, ones);
        return _tokenizer.CountTokens(text) + _conversations.NumImageToken * imageTiles.Sum(t => t - 1);
    }
}

/// <summary>Sets up length measurement for a model folder: its tokenizer, template and tiling from config.json.</summary>
public static class ModelLength
{
    /// <summary>The model's conversation template with config.json's system_message, if it sets one.</summary>
    public static ConversationTemplate ModelTemplate(InternVLConfig config)
    {
        var template = ConversationTemplate.Get(config.Template);
        return config.SystemMessage is { } system ? template with { SystemMessage = system } : template;
    }

    public static ValidationOptions Configure(ValidationOptions options, string modelDir)
    {
        var config = InternVLConfig.Load(modelDir);
        var tokenizer = TextTokenizer.Load(modelDir);
        var tiling = config.ImageOptions();
        return options with
        {
            Length = new TrainingLength(tokenizer, ModelTemplate(config), config.NumImageToken),
            MaxTiles = tiling.MaxTiles, MinTiles = tiling.MinTiles, UseThumbnail = tiling.UseThumbnail,
        };
    }
}
