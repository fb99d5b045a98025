namespace VlmTune.Text;

/// <summary>
/// The token strings InternVL adds to every LLM's tokenizer (in this order, after the LLM's own special tokens) and the
/// ChatML role markers its templates use. Their ids differ per checkpoint: always read them from the tokenizer files.
/// </summary>
public static class SpecialTokens
{
    public const string ImStart = "<|im_start|>";
    public const string ImEnd = "<|im_end|>";
    public const string ImgStart = "<img>";
    public const string ImgEnd = "</img>";
    public const string ImgContext = "<IMG_CONTEXT>";
    public const string QuadStart = "<quad>";
    public const string QuadEnd = "</quad>";
    public const string RefStart = "<ref>";
    public const string RefEnd = "</ref>";
    public const string BoxStart = "<box>";
    public const string BoxEnd = "</box>";

    /// <summary>InternVL's added tokens in the order its training code adds them (<c>internvl_chat_finetune.py</c>).</summary>
    public static IReadOnlyList<string> InternVL { get; } =
        [ImgStart, ImgEnd, ImgContext, QuadStart, QuadEnd, RefStart, RefEnd, BoxStart, BoxEnd];
}
