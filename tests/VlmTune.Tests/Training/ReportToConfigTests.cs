using VlmTune.Training;

namespace VlmTune.Tests.Training;

/// <summary><c>report_to</c> as Hugging Face takes it: one name or a list; unknown integrations refused naming the key.</summary>
public sealed class ReportToConfigTests
{
    private const string Minimal = "model: m\ndata: d.jsonl\n";

    [Theory]
    [InlineData("", false)]
    [InlineData("report_to: none\n", false)]
    [InlineData("report_to: []\n", false)]
    [InlineData("report_to: tensorboard\n", true)]
    [InlineData("report_to: [tensorboard]\n", true)]
    [InlineData("report_to: all\n", true)]
    public void OneNameOrAList(string line, bool tensorBoard)
    {
        var c = TrainConfig.Parse(Minimal + line, "x.yaml");
        Assert.Equal(tensorBoard, c.ReportsToTensorBoard);
        // The resolved config (vis_data/config.yaml) reads back the same.
        Assert.Equal(tensorBoard, TrainConfig.Parse(c.Resolved().ToYaml(), "config.yaml").ReportsToTensorBoard);
    }

    [Fact]
    public void SetOverridesIt()
    {
        Assert.True(TrainConfig.Parse(Minimal, "x.yaml", ["report_to=tensorboard"]).ReportsToTensorBoard);
        Assert.False(TrainConfig.Parse(Minimal + "report_to: tensorboard\n", "x.yaml", ["report_to=none"]).ReportsToTensorBoard);
    }

    [Theory]
    [InlineData("report_to: wandb\n", "'report_to': 'wandb' is not an integration vlmtune writes (use tensorboard, all, none; a list is accepted)")]
    [InlineData("report_to: [tensorboard, Tensorboard]\n", "'report_to': 'Tensorboard' is not an integration vlmtune writes")]
    [InlineData("report_to: [none, tensorboard]\n", "'report_to': none cannot be combined with [none, tensorboard]")]
    [InlineData("report_to: {tensorboard: true}\n", "line 3: 'report_to': expected a string or a list of strings")]
    public void AnythingElseIsOneProblemNamingTheKey(string line, string expected)
    {
        var e = Assert.Throws<ConfigException>(() => TrainConfig.Parse(Minimal + line, "x.yaml"));
        var problem = Assert.Single(e.Problems);
        Assert.StartsWith(expected, problem);
    }
}
