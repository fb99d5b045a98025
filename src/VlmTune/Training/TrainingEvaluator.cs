using System.Text.Json;
using VlmTune.Checkpoints;
using VlmTune.Data;
using VlmTune.Distributed;
using VlmTune.Inference;
using VlmTune.Models;
using VlmTune.Text;
using VlmTune.Vision;
using static TorchSharp.torch;

namespace VlmTune.Training;

/// <summary>One greedy answer to an eval sample's first question.</summary>
public sealed record EvalAnswer(int Index, IReadOnlyList<string> Images, string Question, string Reference, string Answer);

/// <summary>An evaluation: the token-mean loss over the eval samples (all ranks) and rank 0's sample answers.</summary>
public sealed record EvalResult(long Iteration, double Loss, long Samples, long Tokens, IReadOnlyList<EvalAnswer> Answers)
{
    /// <summary>The <c>eval/iter_N.json</c> document (and <c>eval.json</c> of a checkpoint).</summary>
    public string ToJson() => JsonSerializer.Serialize(new
    {
        iter = Iteration, eval_loss = double.IsFinite(Loss) ? Loss : (double?)null, samples = Samples, tokens = Tokens,
        answers = Answers.Select(a => new { index = a.Index, images = a.Images, question = a.Question, reference = a.Reference, answer = a.Answer }),
    }, new JsonSerializerOptions { WriteIndented = true, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping });
}

/// <summary>
/// Evaluation on held-out data during training (eval_data): the loss of every eval sample, encoded exactly as
/// training samples are (same template, tiling and label masking), without gradients and without dropout; data-parallel
/// ranks each take every world-size-th sample and sum their losses and tokens, so the result is the token mean over
/// the whole eval set whatever the number of ranks. Then rank 0 answers the first eval_generate samples' first
/// questions greedily, so a run shows its answers move.
/// </summary>
public sealed class TrainingEvaluator
{
    private readonly TrainConfig _config;
    private readonly InternVLChatModel _model;
    private readonly PreparedModel _prepared;
    private readonly SampleEncoder _encoder;
    private readonly IReadOnlyList<TrainingSample> _samples;
    private readonly ImageFeatureSupply _images;
    private readonly ImageProcessor _answerImages;
    private readonly TextTokenizer _tokenizer;
    private readonly IReadOnlySet<int> _stopIds;
    private readonly Device _device;
    private readonly DataParallel? _dp;
    private readonly int _rank, _worldSize;

    public int SampleCount => _samples.Count;
    /// <summary>What the eval data's loading left out (kept apart from the training counters and checkpoints).</summary>
    public DataCounters Counters { get; } = new();

    public TrainingEvaluator(TrainConfig config, InternVLChatModel model, PreparedModel prepared, TextTokenizer tokenizer,
        ConversationTokenizer conversations, ImageProcessorOptions tiling, Device device, ScalarType dtype, DataParallel? dp, Action<string> warn)
    {
        _config = config;
        _model = model;
        _prepared = prepared;
        _tokenizer = tokenizer;
        _device = device;
        _dp = dp;
        _rank = dp?.Rank ?? 0;
        _worldSize = dp?.WorldSize ?? 1;
        _encoder = new SampleEncoder(conversations, tiling, Counters, m => warn("eval_data: " + m));
        var dataset = TrainDataset.Build(config.EvalData, config.ImageRoot, _encoder, Counters, m => warn("eval_data: " + m), Math.Max(1, config.DataloaderNumWorkers));
        _samples = config.EvalMaxSamples is { } max ? [.. dataset.Samples.Take(max)] : dataset.Samples;
        if (_samples.Count == 0)
            throw new VlmTuneException($"'eval_data': no usable sample in {string.Join(", ", config.EvalData)} ({Counters}); see the warnings above.");
        _images = new ImageFeatureSupply(model, cache: null, device, dtype, visionTrainable: false, projectorTrainable: false);
        _answerImages = new ImageProcessor(tiling);
        _stopIds = InternVLChat.StopIdsFor(config.Model, conversations.Template, tokenizer);
    }

    /// <summary>
    /// Evaluates at <paramref name="iteration"/>; null when <paramref name="stop"/> turned true on the way (a single
    /// process's Ctrl-C: the run then saves its checkpoint without waiting for the evaluation). Data-parallel ranks
    /// always finish, since they must meet in the same collectives.
    /// </summary>
    public EvalResult? Run(long iteration, CancellationToken stop)
    {
        bool Stopped() => _dp is null && stop.IsCancellationRequested;
        double lossSum = 0, tokens = 0, samples = 0;
        var answers = new List<EvalAnswer>();
        using (no_grad())
        {
            _model.eval();   // no dropout
            try
            {
                var mine = Enumerable.Range(0, _samples.Count).Where(i => i % _worldSize == _rank).ToList();
                foreach (var chunk in mine.Chunk(_config.BatchSize))
                {
                    if (Stopped()) return null;
                    var (sum, count, encoded) = BatchLoss(iteration, chunk);
                    lossSum += sum; tokens += count; samples += encoded;
                }
                if (_rank == 0)
                    for (int i = 0; i < Math.Min(_config.EvalGenerate, _samples.Count); i++)
                    {
                        if (Stopped()) return null;
                        if (Answer(i) is { } answer) answers.Add(answer);
                    }
            }
            finally { _prepared.RestoreTrainingModes(_model); }
        }
        if (_dp is not null)
        {
            var sums = _dp.SumOverRanks(lossSum, tokens, samples);
            (lossSum, tokens, samples) = (sums[0], sums[1], sums[2]);
        }
        return new EvalResult(iteration, tokens > 0 ? lossSum / tokens : double.NaN, (long)samples, (long)tokens, answers);
    }

    /// <summary>Summed loss and supervised tokens of some eval samples, and how many of them could be encoded.</summary>
    private (double Sum, long Tokens, int Encoded) BatchLoss(long iteration, int[] indices)
    {
        var encoded = new List<EncodedSample>();
        try
        {
            foreach (var i in indices)
                if (_encoder.Encode(_samples[i]) is { } sample) encoded.Add(sample);
            if (encoded.Count == 0) return (0, 0, 0);
            using var scope = NewDisposeScope();
            using var batch = TrainBatch.Collate(iteration, encoded, indices.Length - encoded.Count, _tokenizer.PadId, padMultiple: _config.PadMultiple(_device.type == TorchSharp.DeviceType.CUDA));
            var features = _images.Embeddings(batch, out _);
            var embeds = _model.EmbedWithImages(batch.InputIds.to(_device), features, _tokenizer.ImgContextId);
            var hidden = _model.language_model.Forward(embeds, new DecoderInputs { RopeLength = batch.RopeLength });
            var (loss, count) = CausalLmLoss.Compute(hidden, batch.Labels, _model.language_model.OutputHead, _config.LossChunkSize);
            return (count > 0 ? loss.item<float>() * (double)count : 0, count, encoded.Count);
        }
        finally { foreach (var s in encoded) s.Dispose(); }
    }

    /// <summary>The greedy answer to sample <paramref name="index"/>'s first question, with the images its placeholders name.</summary>
    private EvalAnswer? Answer(int index)
    {
        var sample = _samples[index];
        var turns = sample.Conversations;
        int first = turns.ToList().FindIndex(t => t.From == "human");
        if (first < 0) return null;
        string question = turns[first].Value;
        string reference = first + 1 < turns.Count && turns[first + 1].From == "gpt" ? turns[first + 1].Value : "";
        string? system = turns.FirstOrDefault(t => t.From == "system")?.Value;
        var images = sample.Images.Take(ImagePlaceholders.Count(question) is var n && n > 0 ? n : sample.Images.Count).ToList();

        using var scope = NewDisposeScope();
        var processed = images.Select(p => _answerImages.Process(p)).ToList();
        try
        {
            var tiles = processed.Select(p => p.TileCount).ToList();
            var prompt = ChatPrompt.Build(_tokenizer, _encoder.Tokenizer.Template, question, tiles, _model.Config.NumImageToken, systemMessage: system);
            Tensor? features = null;
            if (processed.Count > 0)
            {
                var pixels = cat(processed.Select(p => p.PixelValues).ToList(), 0);
                features = _model.ExtractFeatures(pixels.to(_device).to_type(_model.Options.DType), visionGrad: false, projectorGrad: false);
            }
            var result = TokenGenerator.Generate(_model, prompt.InputIds, features, _tokenizer.ImgContextId,
                new SamplingOptions { Temperature = 0, MaxNewTokens = _config.EvalMaxNewTokens }, _stopIds, allowFused: false);
            return new EvalAnswer(index, images, question, reference, _tokenizer.Decode(result.TokenIds));
        }
        finally { foreach (var p in processed) p.Dispose(); }
    }
}
