using Microsoft.Playwright;
using VlmTune.Data;
using VlmTune.Tests.Data;
using VlmTune.Tests.Support;

namespace VlmTune.Tests.Serving;

/// <summary>The <c>data browse</c> page in Chromium, over the CLoT-like set measured with the tiny model.</summary>
public sealed class DatasetBrowserPageTests
{
    [BrowserFact]
    public async Task PageShowsTilesTokensProblemsAndPages()
    {
        var options = ModelLength.Configure(new ValidationOptions { MaxLength = ClotLikeData.MaxLength }, Fixtures.TinyModel);
        await using var host = BrowseHost.Start(options);
        await host.Browser.Scan;
        using var playwright = await Playwright.CreateAsync();
        await using var browser = await playwright.Chromium.LaunchAsync(new BrowserTypeLaunchOptions
        {
            ExecutablePath = BrowserFactAttribute.Chromium,
            Headless = true,
            Args = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
        });
        var page = await browser.NewPageAsync(new BrowserNewPageOptions { ViewportSize = new ViewportSize { Width = 1300, Height = 900 } });
        var pageErrors = new List<string>();
        page.PageError += (_, e) => pageErrors.Add(e);
        await page.GotoAsync(host.Address.ToString());

        // The summary: the counts of data validate, the length histogram, the problems.
        await Assertions.Expect(page.Locator("#counts")).ToHaveAttributeAsync("data-complete", "true");
        await Assertions.Expect(page.Locator("#counts")).ToContainTextAsync($"{ClotLikeData.Records} records");
        await Assertions.Expect(page.Locator("#counts")).ToContainTextAsync($"{ClotLikeData.Broken.Count} errors");
        await Assertions.Expect(page.Locator("#summary .hist div")).ToHaveCountAsync(DataSummary.HistogramBins);
        await Assertions.Expect(page.Locator("#top-problems li")).ToHaveCountAsync(ClotLikeData.Broken.Values.Distinct().Count());

        // The list pages 20 at a time with thumbnails.
        await Assertions.Expect(page.Locator("#list .sample")).ToHaveCountAsync(20);
        await Assertions.Expect(page.Locator("#list .sample[data-index='1'] img")).ToHaveCountAsync(1);
        await page.ClickAsync("#next");
        await Assertions.Expect(page.Locator("#list .sample")).ToHaveCountAsync(ClotLikeData.Records - 20);
        await Assertions.Expect(page.Locator("#list .sample").First).ToHaveAttributeAsync("data-index", "20");
        await page.ClickAsync("#prev");
        await Assertions.Expect(page.Locator("#list .sample").First).ToHaveAttributeAsync("data-index", "0");

        // A sample as training sees it: its 2×1 tiles over the image, token counts equal the library's, labels highlighted.
        var detail = host.Browser.Detail(1)!;
        await page.ClickAsync("#list .sample[data-index='1']");
        await Assertions.Expect(page.Locator("#detail .tiles .tile")).ToHaveCountAsync(2);
        await Assertions.Expect(page.Locator("#detail .image-facts")).ToContainTextAsync("2×1 tiles + thumbnail = 3 tiles");
        await Assertions.Expect(page.Locator("#text-tokens")).ToHaveTextAsync(detail.Tokens!.TextTokens.ToString());
        await Assertions.Expect(page.Locator("#image-tokens")).ToHaveTextAsync(detail.Tokens.ImageTokens.ToString());
        await Assertions.Expect(page.Locator("#total-length")).ToContainTextAsync($"{detail.Sample.Facts.Length} / max {ClotLikeData.MaxLength}");
        await Assertions.Expect(page.Locator("#labels .span.learned").First).ToContainTextAsync("答案 2");

        // The problem filter shows exactly the broken samples.
        await page.CheckAsync("#problems-only");
        await Assertions.Expect(page.Locator("#list .sample")).ToHaveCountAsync(ClotLikeData.Broken.Count);
        await Assertions.Expect(page.Locator("#list .sample.bad")).ToHaveCountAsync(ClotLikeData.Broken.Count);
        await Assertions.Expect(page.Locator("#list")).ToContainTextAsync("ImageMissing");
        await Assertions.Expect(page.Locator("#list")).ToContainTextAsync("TooLong");

        // Search.
        await page.UncheckAsync("#problems-only");
        await page.FillAsync("#search", ClotLikeData.UniqueWord);
        await Assertions.Expect(page.Locator("#list .sample")).ToHaveCountAsync(1);
        await Assertions.Expect(page.Locator("#list .sample")).ToHaveAttributeAsync("data-index", "12");

        var shots = Path.Combine(AppContext.BaseDirectory, "screenshots");
        Directory.CreateDirectory(shots);
        await page.FillAsync("#search", "");
        await Assertions.Expect(page.Locator("#list .sample")).ToHaveCountAsync(20);
        await page.ClickAsync("#list .sample[data-index='1']");
        await Assertions.Expect(page.Locator("#detail .tiles .tile")).ToHaveCountAsync(2);
        await page.ScreenshotAsync(new PageScreenshotOptions { Path = Path.Combine(shots, "data-browse.png"), FullPage = true });
        Assert.Empty(pageErrors);
    }
}
