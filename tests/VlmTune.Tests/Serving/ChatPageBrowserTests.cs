using System.Text.Json;
using Microsoft.Playwright;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Serving;

/// <summary>A browser test that needs Debian's chromium: skipped with a message where it is missing, except under CI.</summary>
public sealed class BrowserFactAttribute : FactAttribute
{
    public const string Chromium = "/usr/bin/chromium";

    public BrowserFactAttribute()
    {
        if (!Fixtures.Available && !Fixtures.UnderCi) Skip = Fixtures.MissingMessage;
        else if (!File.Exists(Chromium) && !Fixtures.UnderCi) Skip = $"{Chromium} not found: install Debian's chromium (apt-get install -y chromium) to run the chat page test.";
    }
}

public sealed class ChatPageBrowserTests(ServerFixture fixture) : IClassFixture<ServerFixture>
{
    [BrowserFact]
    public async Task PageSendsAPromptWithAnImageAndShowsTheStreamedAnswer()
    {
        await using var server = await fixture.StartAsync();
        using var playwright = await Playwright.CreateAsync();
        await using var browser = await playwright.Chromium.LaunchAsync(new BrowserTypeLaunchOptions
        {
            ExecutablePath = BrowserFactAttribute.Chromium,
            Headless = true,
            Args = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
        });
        var page = await browser.NewPageAsync(new BrowserNewPageOptions { ViewportSize = new ViewportSize { Width = 1100, Height = 700 } });
        var pageErrors = new List<string>();
        page.PageError += (_, e) => pageErrors.Add(e);
        await page.GotoAsync(server.Address.ToString());
        await Assertions.Expect(page.Locator("#status")).ToHaveTextAsync($"model: {ServerFixture.ModelId}");

        var imagePath = Path.Combine(Fixtures.TinyDir, "images", "clot.jpg");
        await page.SetInputFilesAsync("#image", imagePath);
        await Assertions.Expect(page.Locator("#pending img")).ToHaveCountAsync(1);
        await page.FillAsync("#max_tokens", "8");
        await page.FillAsync("#prompt", "What is in this picture?");
        await page.ClickAsync("#send");
        var answer = page.Locator(".msg.assistant[data-done='true'] span");
        await Assertions.Expect(answer).ToHaveCountAsync(1, new() { Timeout = 120_000 });
        var shown = await answer.InnerTextAsync();
        Assert.DoesNotContain("[error]", shown);

        // The page used the API: the same request straight to the API gives the same answer.
        var response = await server.PostAsync(new
        {
            model = ServerFixture.ModelId, temperature = 0, top_p = 1, max_tokens = 8,
            messages = new[] { new { role = "user", content = new object[] { new { type = "image_url", image_url = new { url = ServerFixture.DataUrl(ServerFixture.Clot) } }, new { type = "text", text = "What is in this picture?" } } } },
        });
        using var doc = JsonDocument.Parse(await response.Content.ReadAsStringAsync());
        var expected = doc.RootElement.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString()!;
        Assert.False(string.IsNullOrEmpty(expected));
        Assert.Equal(expected.Trim(), shown.Trim());
        // The page grew the answer from several streamed deltas (counted by the page as it appends them).
        var chunks = int.Parse(await page.Locator(".msg.assistant[data-done='true']").GetAttributeAsync("data-chunks") ?? "0");
        Assert.True(chunks > 1, $"the page showed {chunks} streamed pieces");
        await Assertions.Expect(page.Locator(".msg.user img")).ToHaveCountAsync(1);

        var shots = Path.Combine(AppContext.BaseDirectory, "screenshots");
        Directory.CreateDirectory(shots);
        await page.ScreenshotAsync(new PageScreenshotOptions { Path = Path.Combine(shots, "chat-page.png"), FullPage = true });
        Assert.Empty(pageErrors);
    }
}
