namespace VlmTune.Tests.Serving;

/// <summary>The strict exposition reader of the metrics tests refuses what a scraper would misread.</summary>
public sealed class PrometheusExpositionTests
{
    private const string Histogram = "# HELP h_seconds A histogram.\n# TYPE h_seconds histogram\n";

    [Fact]
    public void AValidExpositionParses()
    {
        var e = PrometheusExposition.Parse(
            "# HELP c_total A counter with \\\\ and \\n.\n# TYPE c_total counter\nc_total{model=\"a\\\"b\",status=\"200\"} 3\nc_total{model=\"\",status=\"400\"} 1e0\n" +
            Histogram + "h_seconds_sum{model=\"a\"} 0.5\nh_seconds_count{model=\"a\"} 2\nh_seconds_bucket{model=\"a\",le=\"0.1\"} 1\nh_seconds_bucket{model=\"a\",le=\"+Inf\"} 2\n" +
            "# HELP g A gauge.\n# TYPE g gauge\ng NaN\n");
        Assert.Equal("A counter with \\ and \n.", e.Families["c_total"].Help);
        Assert.Equal(3, e.Value("c_total", "model=a\"b", "status=200"));
        Assert.Equal(4, e.Sum("c_total"));
        Assert.Equal(2, e.Value("h_seconds_count", "model=a"));
        Assert.Equal(0, e.Value("c_total", "model=x", "status=200"));
    }

    [Theory]
    [InlineData("x 1\n", "belongs to no family")]
    [InlineData("# TYPE c_total counter\nc_total 1\n", "without a HELP")]
    [InlineData("# HELP c_total C.\n# TYPE c_total counter\nc_total -1\n", "counter c_total is -1")]
    [InlineData("# HELP c_total C.\n# TYPE c_total counter\nc_total 1\nc_total 2\n", "appears twice")]
    [InlineData("# HELP c_total C.\n# TYPE c_total counter\nc_total 1", "line feed")]
    [InlineData("# HELP c_total C.\n# TYPE c_total counter\nc_total{a=\"1} 1\n", "unterminated")]
    [InlineData("# HELP c_total C.\n# TYPE c_total counter\nc_total 0x1\n", "bad number")]
    [InlineData("# HELP c_total C.\n# TYPE c_total counter\n# HELP g G.\n# TYPE g gauge\ng 1\nc_total 1\n", "not one group")]
    [InlineData(Histogram + "h_seconds_sum 1\nh_seconds_count 2\nh_seconds_bucket{le=\"1\"} 2\nh_seconds_bucket{le=\"+Inf\"} 1\n", "not cumulative")]
    [InlineData(Histogram + "h_seconds_sum 1\nh_seconds_count 3\nh_seconds_bucket{le=\"1\"} 2\nh_seconds_bucket{le=\"+Inf\"} 2\n", "!= _count")]
    [InlineData(Histogram + "h_seconds_sum 1\nh_seconds_count 2\nh_seconds_bucket{le=\"1\"} 2\n", "not +Inf")]
    [InlineData(Histogram + "h_seconds_sum 1\nh_seconds_bucket{le=\"+Inf\"} 2\n", "no _count")]
    [InlineData(Histogram + "h_seconds_sum 1\nh_seconds_count 2\nh_seconds_bucket{le=\"2\"} 1\nh_seconds_bucket{le=\"1\"} 1\nh_seconds_bucket{le=\"+Inf\"} 2\n", "does not follow")]
    public void WhatAScraperWouldMisreadIsRefused(string text, string problem)
    {
        var error = Assert.Throws<FormatException>(() => PrometheusExposition.Parse(text));
        Assert.Contains(problem, error.Message);
    }

    [Fact]
    public void ACounterThatWentDownIsCaught()
    {
        const string head = "# HELP c_total C.\n# TYPE c_total counter\n";
        var before = PrometheusExposition.Parse(head + "c_total{a=\"1\"} 5\n");
        PrometheusExposition.AssertNeverDecreases(before, PrometheusExposition.Parse(head + "c_total{a=\"1\"} 5\n"));
        Assert.ThrowsAny<Exception>(() => PrometheusExposition.AssertNeverDecreases(before, PrometheusExposition.Parse(head + "c_total{a=\"1\"} 4\n")));
        Assert.ThrowsAny<Exception>(() => PrometheusExposition.AssertNeverDecreases(before, PrometheusExposition.Parse(head + "c_total{a=\"2\"} 9\n")));
    }
}
