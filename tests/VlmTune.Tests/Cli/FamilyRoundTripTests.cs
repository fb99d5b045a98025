using System.Net.Http.Json;
using System.Text.Json;
using VlmTune.Tests.Support;
using VlmTune.Tests.Training;
using VlmTune.Training;

namespace VlmTune.Tests.Cli;

/// <summary>
/// The whole path for the other families on CPU: the released-layout tiny Qwen2 (InternVL3) and Qwen3 (InternVL3.5)
/// checkpoints chat as the official code does (prompt ids through our tokenizer and template, greedy ids), train a
/// LoRA adapter, merge it, and the merged folder chats and serves the same answer as the base with the adapter.
/// </summary>
public sealed class FamilyRoundTripTests
{
    [FixtureTheory]
    [InlineData("qwen2", "text_only")]
    [InlineData("qwen3", "text_only")]
    [InlineData("qwen3", "two_images")]
    [InlineData("phi3", "text_only")]
    [InlineData("llama", "text_only")]
    public void ChatBuildsTheOfficialPromptAndGreedyIds(string variant, string caseName)
    {
        var dir = FamilyFixtures.CompleteModelDir(variant);
        try
        {
            var c = FamilyFixtures.Golden(variant).GetProperty("cases").GetProperty(caseName);
            var (expected, firm) = FamilyFixtures.GreedyIds(c);
            var args = new List<string> { "chat", "--model", dir, "--prompt", c.GetProperty("question").GetString()!, "--max-new-tokens", firm.ToString(), "--json" };
            foreach (var image in c.GetProperty("images").EnumerateArray())
                args.AddRange(["--image", FamilyFixtures.ImagePath(variant, image.GetString()!)]);
            var (code, stdout, stderr) = CliProcess.RunAsync(args, timeoutSeconds: 300).GetAwaiter().GetResult();
            Assert.True(code == 0, stderr);
            using var json = JsonDocument.Parse(stdout);
            Assert.Equal(c.GetProperty("prompt_ids").GetArrayLength(), json.RootElement.GetProperty("prompt_tokens").GetInt32());
            Assert.Equal(expected[..firm], json.RootElement.GetProperty("token_ids").EnumerateArray().Select(e => e.GetInt32()).Take(firm).ToArray());
        }
        finally { Directory.Delete(dir, true); }
    }

    [FixtureTheory]
    [InlineData("qwen2")]
    [InlineData("qwen3")]
    public async Task TrainMergeChatServe(string variant)
    {
        var model = FamilyFixtures.CompleteModelDir(variant);
        using var data = new TrainTestData(samples: 4);
        try
        {
            TrainResult trained;
            using (var trainer = new Trainer(data.Config($"model={model}", "max_steps=4", "lr=0.01", "freeze_projector=false", "dataloader_num_workers=0")))
                trained = trainer.Train();
            Assert.Contains(trained.Losses, double.IsFinite);
            var adapterConfig = File.ReadAllText(Path.Combine(trained.LastCheckpoint!, "adapter_config.json"));
            Assert.Contains("self_attn.q_proj", adapterConfig);       // the official wrap_llm_lora names, not InternLM2's
            Assert.Equal(variant == "qwen2", adapterConfig.Contains("\"lm_head\""));   // Qwen3's head is tied: not adapted

            string merged = Path.Combine(data.Dir, "merged");
            var (code, stdout, stderr) = await CliProcess.RunAsync(["merge", "--base", model, "--adapter", data.WorkDir, "--out", merged, "--dtype", "float32"], timeoutSeconds: 300);
            Assert.True(code == 0, stderr + stdout);
            Assert.Contains("verify: max |logit difference|", stdout);
            bool mergedHasHead = Directory.GetFiles(merged, "*.safetensors").Any(f => SafetensorsHas(f, "language_model.lm_head.weight"));
            Assert.Equal(variant == "qwen2", mergedHasHead);   // a tied head stays tied: no lm_head tensor
            using (var tokenizerConfig = JsonDocument.Parse(File.ReadAllText(Path.Combine(merged, "tokenizer_config.json"))))
                Assert.Contains("<|im_start|>assistant", tokenizerConfig.RootElement.GetProperty("chat_template").GetString());

            string image = Path.Combine(data.Dir, "images", "tiny.png");
            var fromMerged = await ChatIds(merged, image);
            Assert.Equal(await ChatIds(model, image, adapter: trained.LastCheckpoint), fromMerged);

            // vlmtune serve on the merged folder answers the same greedy tokens through the OpenAI API.
            int port = VlmTune.Tests.Distributed.TcpRendezvousTests.FreePort();
            using var server = CliProcess.Start(["serve", "--model", merged, "--model-id", "tiny-family", "--port", port.ToString(), "--allow-local-images", Path.GetDirectoryName(image)!]);
            using var http = new HttpClient { BaseAddress = new Uri($"http://127.0.0.1:{port}"), Timeout = TimeSpan.FromSeconds(120) };
            await WaitReady(http);
            var body = new
            {
                model = "tiny-family", max_tokens = 6, temperature = 0,
                messages = new object[] { new { role = "user", content = new object[] {
                    new { type = "image_url", image_url = new { url = "file://" + image } }, new { type = "text", text = "What is in the picture?" } } } },
            };
            var response = await http.PostAsJsonAsync("/v1/chat/completions", body);
            Assert.True(response.IsSuccessStatusCode, await response.Content.ReadAsStringAsync());
            var served = JsonDocument.Parse(await response.Content.ReadAsStringAsync()).RootElement.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString();
            var (_, chatOut, _) = await CliProcess.RunAsync(["chat", "--model", merged, "--image", image, "--prompt", "What is in the picture?", "--max-new-tokens", "6", "--json"], timeoutSeconds: 300);
            Assert.Equal(JsonDocument.Parse(chatOut).RootElement.GetProperty("text").GetString(), served);
        }
        finally { Directory.Delete(model, true); }
    }

    /// <summary>QLoRA (NF4 decoder linears) and full fine-tuning run on each Llama-layout family and on Phi-3.</summary>
    [FixtureTheory]
    [InlineData("qwen2", "qlora")]
    [InlineData("qwen3", "qlora")]
    [InlineData("phi3", "qlora")]
    [InlineData("qwen3", "full")]
    [InlineData("llama", "full")]
    public void QloraAndFullTrainingRun(string variant, string mode)
    {
        var model = FamilyFixtures.CompleteModelDir(variant);
        using var data = new TrainTestData(samples: 4);
        try
        {
            TrainResult trained;
            using (var trainer = new Trainer(data.Config($"model={model}", $"mode={mode}", "max_steps=2", "save_steps=2", "dataloader_num_workers=0")))
                trained = trainer.Train();
            Assert.Equal(2, trained.Iterations);
            Assert.Contains(trained.Losses, double.IsFinite);
            Assert.NotNull(trained.LastCheckpoint);
        }
        finally { Directory.Delete(model, true); }
    }

    private static bool SafetensorsHas(string file, string name)
    {
        using var f = VlmTune.Checkpoints.SafetensorsFile.Open(file);
        return f.Entries.ContainsKey(name);
    }

    private static async Task<int[]> ChatIds(string model, string image, string? adapter = null)
    {
        var args = new List<string> { "chat", "--model", model, "--prompt", "What is in the picture?", "--image", image, "--max-new-tokens", "6", "--json" };
        if (adapter is not null) args.AddRange(["--adapter", adapter]);
        var (code, stdout, stderr) = await CliProcess.RunAsync(args, timeoutSeconds: 300);
        Assert.True(code == 0, stderr);
        using var json = JsonDocument.Parse(stdout);
        return json.RootElement.GetProperty("token_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
    }

    private static async Task WaitReady(HttpClient http)
    {
        for (int i = 0; i < 240; i++)
        {
            try { if ((await http.GetAsync("/v1/models")).IsSuccessStatusCode) return; }
            catch (HttpRequestException) { }
            await Task.Delay(500);
        }
        throw new TimeoutException("vlmtune serve did not become ready in 120 s");
    }
}
