using Microsoft.Playwright;
using VlmTune.Tests.Support;
using VlmTune.Tests.Training;

namespace VlmTune.Tests.Serving;

/// <summary>The <c>vlmtune dashboard</c> page in Chromium over generated run folders, following a run as it logs.</summary>
public sealed class DashboardPageTests
{
    private static readonly LocatorAssertionsToHaveAttributeOptions Slow = new() { Timeout = 30_000 };

    [BrowserFact]
    public async Task PageShowsCurvesEvalAnswersAndFollowsTheRunWithoutReload()
    {
        await using var host = new DashboardHost();
        using var playwright = await Playwright.CreateAsync();
        await using var browser = await playwright.Chromium.LaunchAsync(new BrowserTypeLaunchOptions
        {
            ExecutablePath = BrowserFactAttribute.Chromium,
            Headless = true,
            Args = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
        });
        var page = await browser.NewPageAsync(new BrowserNewPageOptions { ViewportSize = new ViewportSize { Width = 1400, Height = 1000 } });
        var pageErrors = new List<string>();
        page.PageError += (_, e) => pageErrors.Add(e);
        await page.GotoAsync(host.Address.ToString());

        // Every run, side by side in the table and together in the curves (5 + 8 + 3 logged iterations).
        await Assertions.Expect(page.Locator("#run-rows .run")).ToHaveCountAsync(3);
        var running = page.Locator($"#run-rows .run[data-id='{DashboardHost.RunningId}']");
        await Assertions.Expect(running.Locator(".iter")).ToHaveTextAsync("32/40");
        await Assertions.Expect(running.Locator(".eta")).ToHaveTextAsync("0:00:02");
        await Assertions.Expect(running.Locator(".ckpts")).ToContainTextAsync("iter_16, iter_32");
        await Assertions.Expect(page.Locator($"#run-rows .run[data-id='{DashboardHost.FinishedId}'] .state")).ToHaveTextAsync("finished");
        var curves = page.Locator("#curves");
        await Assertions.Expect(curves).ToHaveAttributeAsync("data-points", "16", Slow);
        Assert.True(await curves.EvaluateAsync<int>("img => img.naturalWidth") > 0, "the curves image did not load");

        // The running run's latest evaluation: its answers, each with its image.
        await running.Locator(".label").ClickAsync();
        await Assertions.Expect(page.Locator("#detail-title")).ToHaveTextAsync(DashboardHost.RunningId);
        await Assertions.Expect(page.Locator("#answers .answer")).ToHaveCountAsync(2);
        await Assertions.Expect(page.Locator("#answers .answer[data-index='0'] .model-answer")).ToHaveTextAsync("answer: The model's answer 0 at 32.");
        await Assertions.Expect(page.Locator("#eval-loss")).ToHaveTextAsync("eval loss 1.5000");
        var image = page.Locator("#answers .answer[data-index='0'] img");
        await Assertions.Expect(image).ToHaveCountAsync(1);
        await page.WaitForFunctionAsync("() => document.querySelector(\"#answers .answer[data-index='0'] img\").naturalWidth === 64");
        await Assertions.Expect(page.Locator("#checkpoints .checkpoint")).ToHaveCountAsync(2);
        await Assertions.Expect(page.Locator("#config")).ToContainTextAsync("name: 'lora'");

        // An earlier evaluation on request.
        await page.SelectOptionAsync("#eval-iter", "16");
        await Assertions.Expect(page.Locator("#answers .answer[data-index='1'] .model-answer")).ToHaveTextAsync("answer: The model's answer 1 at 16.");
        await page.SelectOptionAsync("#eval-iter", "32");

        // The trainer logs another iteration: the page shows it without being reloaded.
        await page.EvaluateAsync("() => { window.notReloaded = true; }");
        File.AppendAllText(Path.Combine(host.Running, "vis_data", "scalars.json"), FakeRuns.ScalarsLine(36) + "\n");
        File.AppendAllText(Path.Combine(host.Running, "20261201_120000.log"), FakeRuns.LogLine(36, 40, "0:00:01") + "\n");
        await Assertions.Expect(running.Locator(".iter")).ToHaveTextAsync("36/40", new() { Timeout = 30_000 });
        await Assertions.Expect(running.Locator(".eta")).ToHaveTextAsync("0:00:01");
        await Assertions.Expect(curves).ToHaveAttributeAsync("data-points", "17", Slow);
        Assert.True(await page.EvaluateAsync<bool>("() => window.notReloaded === true"), "the page was reloaded");

        // Comparing fewer runs redraws the curves with only those.
        await page.Locator($"#run-rows .run[data-id='{DashboardHost.OtherId}'] .compare").ClickAsync();
        await Assertions.Expect(curves).ToHaveAttributeAsync("data-points", "14", Slow);
        await Assertions.Expect(curves).ToHaveAttributeAsync("data-runs", "2", Slow);

        // In the test output, as the other page tests do; docs/results/dashboard.png is a copy of one (a test must not
        // rewrite tracked files on every run).
        string shots = Path.Combine(AppContext.BaseDirectory, "screenshots");
        Directory.CreateDirectory(shots);
        await page.ScreenshotAsync(new PageScreenshotOptions { Path = Path.Combine(shots, "dashboard.png"), FullPage = true });
        Assert.Empty(pageErrors);
    }
}
