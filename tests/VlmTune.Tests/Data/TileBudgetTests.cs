using VlmTune.Data;
using VlmTune.Tests.Support;
using VlmTune.Text;
using VlmTune.Vision;

namespace VlmTune.Tests.Data;

/// <summary>The one tile-budget rule: data validate and the trainer's encoder agree about every sample's tiles.</summary>
public class TileBudgetTests
{
    [Fact]
    public void SharingSplitsTheBudgetAtLeastOneTileEachAndPerImageKeepsIt()
    {
        var options = new ImageProcessorOptions { MaxTiles = 12 };
        Assert.Equal(12, options.ForImages(1, TileSharing.SplitBetweenImages).MaxTiles);
        Assert.Equal(6, options.ForImages(2, TileSharing.SplitBetweenImages).MaxTiles);
        Assert.Equal(4, options.ForImages(3, TileSharing.SplitBetweenImages).MaxTiles);
        Assert.Equal(1, options.ForImages(20, TileSharing.SplitBetweenImages).MaxTiles);
        Assert.Equal(3, options.ForImages(2, TileSharing.SplitBetweenImages, maxTiles: 6).MaxTiles);   // a meta file's own max_dynamic_patch
        Assert.Equal(12, options.ForImages(3, TileSharing.PerImage).MaxTiles);
    }

    [FixtureFact]
    public void ValidationAndTheTrainingEncoderGiveATwoImageSampleTheSameTiles()
    {
        // A 1344-px square makes 3×3 tiles + thumbnail with 12 to spend, 2×2 + thumbnail with the 6 each of two images get.
        using var dir = new TempDir();
        dir.Jpeg("root/a.jpg", 1344, 1344);
        dir.Jpeg("root/b.jpg", 1344, 1344);
        dir.Write("data.jsonl", """{"image": ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "<image>\n<image>\nsame?"}, {"from": "gpt", "value": "yes"}]}""" + "\n");

        var facts = DataValidator.Check(TrainingData.ReadEntries(dir["data.jsonl"], dir["root"]), new ValidationOptions { MaxTiles = 12 }).Single();
        Assert.Equal([5, 5], facts.Images.Select(i => i.Tiles ?? 0));   // thumbnail included

        var tokenizer = new ConversationTokenizer(TextTokenizer.Load(Fixtures.TinyModel), ConversationTemplate.Get("internlm2-chat"), 256, 8192);
        var encoder = new SampleEncoder(tokenizer, new ImageProcessorOptions { MaxTiles = 12 }, new DataCounters(), m => Assert.Fail(m));
        var sample = TrainingData.ReadEntries(dir["data.jsonl"], dir["root"]).Single().Sample!;
        using var encoded = encoder.Encode(sample)!;
        Assert.Equal(10, encoded.Tiles);
        Assert.Equal(10, encoded.Pixels!.shape[0]);
        Assert.Equal(encoded.InputIds.Length, encoder.MeasureLength(sample));
    }
}
