using System.Text.Json;
using VlmTune.Checkpoints;
using VlmTune.Inference;
using VlmTune.Serving;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Serving;

public sealed class AdapterServingTests
{
    /// <summary>--adapter: the served answer is the adapted model's (LoRA merged), not the base model's.</summary>
    [FixtureFact]
    public async Task ServedAnswerIsTheAdaptedModels()
    {
        var question = ServerFixture.GoldenQuestion("text_only");
        var greedy = ServerFixture.Golden("text_only", "greedy_ids");
        int[] expected;
        using (var reference = InternVLChat.Load(Fixtures.TinyModel))
        {
            // The adapter kept as separate LoRA branches (how it was trained), decoded by the reference generator.
            PeftAdapter.Load(reference.Model.language_model, Fixtures.Adapter);
            using var prompt = reference.Prepare(new ChatRequest { Question = question });
            expected = TokenGenerator.Generate(reference.Model, prompt.InputIds, null, reference.Tokenizer.ImgContextId,
                new SamplingOptions { MaxNewTokens = greedy.Length }, reference.StopIds).TokenIds.ToArray();
        }
        Assert.NotEqual(greedy, expected);

        var options = new ServerOptions { ModelDir = Fixtures.TinyModel, AdapterDir = Fixtures.Adapter, ModelId = "tiny", Port = 0 };
        using var chat = InternVLChat.Load(Fixtures.TinyModel, new ChatLoadOptions { AdapterDir = Fixtures.Adapter });
        Assert.Empty(PeftAdapter.LoraLinears(chat.Model));   // merged: no branches left to slow decoding
        var client = VlmTuneServer.CreateChatClient(chat, options);
        await using var server = new TestServer(VlmTuneServer.Build(options, client), client);
        await server.StartAsync();
        var response = await server.PostAsync(TestServer.UserRequest(question, maxTokens: greedy.Length));
        using var doc = JsonDocument.Parse(await response.Content.ReadAsStringAsync());
        Assert.Equal(chat.Tokenizer.Decode(expected), doc.RootElement.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString());
    }

    [Fact]
    public void MissingAdapterFilesAreNamed()
    {
        var dir = Directory.CreateTempSubdirectory("vlmtune-noadapter-");
        try
        {
            var e = Assert.Throws<CheckpointException>(() => AdapterCheckpoint.Open(dir.FullName, new Dictionary<string, long[]>()));
            Assert.Contains("adapter_config.json", e.Message);
        }
        finally { dir.Delete(true); }
    }
}
