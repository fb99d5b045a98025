using System.Text.Json;
using VlmTune.Checkpoints;
using VlmTune.Inference;
using VlmTune.Tests.Support;
using VlmTune.Training;

namespace VlmTune.Tests.Training;

/// <summary>Evaluation during training (eval_data): the loss, the schedule, the answers, the best checkpoint.</summary>
[Collection(GlobalTorchRng.Name)]
public sealed class EvaluationTests
{
    [FixtureFact]
    public void EvalLossIsTheTokenMeanTrainingComputesOnTheSameSamples()
    {
        // Four samples in one micro-batch, a learning rate too small to move a weight: the evaluation after the step
        // sees the model the step's forward pass saw, in batches of another size (padding differs).
        using var data = new TrainTestData(samples: 4);
        using var trainer = new Trainer(data.Config("batch_size=4", "max_steps=1", "lr=1e-12", "weight_decay=0", $"eval_data={data.DataFile}", "eval_generate=0"));
        var result = trainer.Train();
        var eval = Assert.Single(result.Evaluations);
        Assert.Equal(1, eval.Iteration);
        Assert.Equal(4, eval.Samples);
        Assert.True(Math.Abs(eval.Loss - result.Losses[0]) <= 1e-5 * result.Losses[0], $"eval {eval.Loss} vs training {result.Losses[0]}");
    }

    [FixtureFact]
    public void EvaluatesOnScheduleLogsAnswersAndKeepsTheBestCheckpoint()
    {
        using var data = new TrainTestData();
        using var trainer = new Trainer(data.Config("max_steps=8", "lr=0.01", "eval_steps=4", "save_steps=4", "save_total_limit=1",
            $"eval_data={data.DataFile}", "eval_max_samples=6", "eval_generate=2", "eval_max_new_tokens=8", "save_best=true"));
        var result = trainer.Train();

        Assert.Equal([4L, 8L], result.Evaluations.Select(e => e.Iteration));
        Assert.All(result.Evaluations, e => Assert.Equal(6, e.Samples));
        Assert.True(result.Evaluations[1].Loss < result.Evaluations[0].Loss, "the eval loss did not fall while training learned");

        // mmengine's scalars.json gets one eval_loss line per evaluation; the log an Iter(val) line.
        var scalars = File.ReadAllLines(Path.Combine(result.RunDir, "vis_data", "scalars.json")).Select(l => JsonDocument.Parse(l).RootElement)
            .Where(e => e.TryGetProperty("eval_loss", out _)).ToList();
        Assert.Equal([4L, 8L], scalars.Select(e => e.GetProperty("iter").GetInt64()));
        Assert.Equal(result.Evaluations[1].Loss, scalars[1].GetProperty("eval_loss").GetDouble(), 12);
        var log = File.ReadAllText(Directory.GetFiles(result.RunDir, "*.log").Single());
        Assert.Contains("Iter(val) [4/8]  eval_loss: ", log);

        // The answers, in the run folder and in the checkpoint of that iteration.
        using var answers = JsonDocument.Parse(File.ReadAllText(Path.Combine(result.RunDir, "eval", "iter_8.json")));
        var first = answers.RootElement.GetProperty("answers")[0];
        Assert.Equal(2, answers.RootElement.GetProperty("answers").GetArrayLength());
        Assert.Equal("<image>\nWhat is in the picture?", first.GetProperty("question").GetString());
        Assert.Equal("A tiny picture of a cat.", first.GetProperty("reference").GetString());
        Assert.EndsWith("tiny.png", first.GetProperty("images")[0].GetString());
        Assert.Equal(File.ReadAllText(Path.Combine(result.RunDir, "eval", "iter_8.json")), File.ReadAllText(Path.Combine(data.WorkDir, "iter_8", IterCheckpoint.EvalFile)));

        // The answer is what chat gives with that checkpoint (LoRA kept as a branch, as in training).
        using (var chat = InternVLChat.Load(Fixtures.TinyModel, new ChatLoadOptions { AdapterDir = Path.Combine(data.WorkDir, "iter_8"), MergeAdapter = false, MaxTiles = 1 }))
        {
            var reply = chat.Chat(new ChatRequest
            {
                Question = first.GetProperty("question").GetString()!, ImagePaths = [first.GetProperty("images")[0].GetString()!],
                Sampling = new SamplingOptions { Temperature = 0, MaxNewTokens = 8 },
            });
            Assert.Equal(reply.Text, first.GetProperty("answer").GetString());
        }

        // best/ holds the lowest eval loss and outlives pruning (save_total_limit 1 removed iter_4).
        int bestAt = result.Evaluations.MinBy(e => e.Loss)!.Iteration is var i ? (int)i : 0;
        var best = CheckpointStateOf(Path.Combine(data.WorkDir, IterCheckpoint.BestFolder));
        Assert.Equal(bestAt, best.GetProperty("iteration").GetInt32());
        Assert.Equal(result.Evaluations.Min(e => e.Loss), best.GetProperty("eval_loss").GetDouble(), 12);
        Assert.False(Directory.Exists(Path.Combine(data.WorkDir, "iter_4")));
        Assert.Equal(Path.Combine(data.WorkDir, "iter_8"), IterCheckpoint.Latest(data.WorkDir));
        Assert.True(File.Exists(Path.Combine(data.WorkDir, IterCheckpoint.BestFolder, PeftAdapter.WeightsFile)));
    }

    [FixtureFact]
    public void ABetterBestIsKeptAcrossAResume()
    {
        // The best of an earlier run stays unless the resumed run beats it: a worse eval does not overwrite best/.
        using var data = new TrainTestData(samples: 4);
        string[] settings = ["max_steps=2", "eval_steps=0", $"eval_data={data.DataFile}", "eval_generate=0", "save_best=true"];
        using (var trainer = new Trainer(data.Config([.. settings, "lr=0.01"]))) trainer.Train();
        string bestState = Path.Combine(data.WorkDir, IterCheckpoint.BestFolder, IterCheckpoint.StateFile);
        double first = CheckpointStateOf(Path.GetDirectoryName(bestState)!).GetProperty("eval_loss").GetDouble();
        File.WriteAllText(bestState, File.ReadAllText(bestState).Replace($"\"eval_loss\": {first.ToString("R", System.Globalization.CultureInfo.InvariantCulture)}", "\"eval_loss\": 0.001"));
        using (var trainer = new Trainer(data.Config([.. settings, "max_steps=4", "lr=0.01"]), new TrainerOptions { Resume = "auto" })) trainer.Train();
        Assert.Equal(0.001, CheckpointStateOf(Path.GetDirectoryName(bestState)!).GetProperty("eval_loss").GetDouble());
    }

    [Fact]
    public void EvalSettingsAreChecked()
    {
        var e = Assert.Throws<ConfigException>(() => TrainConfig.Parse(
            "model: m\ndata: d.jsonl\naccumulative_counts: 4\nsave_steps: 8\neval_steps: 6\neval_max_samples: 0\neval_generate: -1\nsave_best: true\n", "eval.yaml"));
        Assert.Contains("'eval_steps': 6 is not a multiple of accumulative_counts (4); evaluations follow optimizer steps", e.Message);
        Assert.Contains("'eval_max_samples': must be at least 1 or null (got 0)", e.Message);
        Assert.Contains("'eval_generate': must not be negative (got -1)", e.Message);
        Assert.Contains("'save_best': needs eval_data", e.Message);
        Assert.Equal(8, TrainConfig.Parse("model: m\ndata: d.jsonl\naccumulative_counts: 4\nsave_steps: 8\n", "a.yaml").Resolved().EvalSteps);
    }

    [FixtureFact]
    public void AMissingEvalFileIsReportedBeforeAnyWork()
    {
        using var data = new TrainTestData(samples: 2);
        string missing = Path.Combine(data.Dir, "held-out.jsonl");
        using var trainer = new Trainer(data.Config($"eval_data={missing}"));
        var e = Assert.Throws<ConfigException>(() => trainer.Setup());
        Assert.Contains($"'eval_data': file not found: {missing}", e.Message);
    }

    private static JsonElement CheckpointStateOf(string dir) =>
        JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, IterCheckpoint.StateFile))).RootElement;
}
