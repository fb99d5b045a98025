using System.Globalization;
using ScottPlot;

namespace VlmTune.Training.Reports;

/// <summary>A run's scalars under the label its curves get in the legend.</summary>
public sealed record CurveRun(string Label, RunScalars Scalars);

/// <summary>A rendered figure; <see cref="Missing"/> names each series that had no value to draw ("RUN: no grad_norm values").</summary>
public sealed record CurvesImage(byte[] Png, int Width, int Height, IReadOnlyList<string> Missing);

/// <summary>
/// The training curves of one or more runs as one PNG of four panels (2 × 2): loss with the eval loss when there is
/// one, learning rate, gradient norm, tokens/s, over the iteration. <c>vlmtune plot</c>, the <c>curves.png</c> that
/// every run writes at its end and the dashboard all draw through here. ScottPlot does the plotting (axes, ticks,
/// legends, text); this class only chooses what goes where.
/// </summary>
public static class TrainingCurves
{
    public const int DefaultWidth = 1200, DefaultHeight = 800;
    public const string FileName = "curves.png";

    /// <summary>The panels in drawing order (left to right, top to bottom): the scalars.json key and the title.</summary>
    public static IReadOnlyList<(string Key, string Title)> Panels { get; } =
        [("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "grad norm (before clipping)"), ("tokens_per_s", "tokens/s")];

    private static readonly Func<TrainPoint, double?>[] Values = [p => p.Loss, p => p.Lr, p => p.GradNorm, p => p.TokensPerSecond];

    /// <summary>Pixel bounds of panel <paramref name="panel"/> (0..3) in a figure of this size: its quadrant.</summary>
    public static (int Left, int Top, int Right, int Bottom) PanelBounds(int panel, int width, int height)
    {
        int column = panel % 2, row = panel / 2;
        return (column * width / 2, row * height / 2, (column + 1) * width / 2, (row + 1) * height / 2);
    }

    /// <summary>The colour of the <paramref name="run"/>-th run's curves (its eval loss is dashed, in the same colour when there are several runs, else in <c>RunColor(1)</c>).</summary>
    public static (byte R, byte G, byte B) RunColor(int run)
    {
        var c = Palette.GetColor(run);
        return (c.R, c.G, c.B);
    }

    private static readonly IPalette Palette = new ScottPlot.Palettes.Category10();

    /// <summary>Renders the figure in memory.</summary>
    public static CurvesImage Render(IReadOnlyList<CurveRun> runs, int width = DefaultWidth, int height = DefaultHeight)
    {
        if (runs.Count == 0) throw new ArgumentException("no run to plot", nameof(runs));
        if (width < 200 || height < 150) throw new ArgumentException($"a {width}×{height} figure is too small for four panels (at least 200×150)");
        var missing = new List<string>();
        var figure = new Multiplot();
        figure.AddPlots(Panels.Count);
        figure.Layout = new ScottPlot.MultiplotLayouts.Grid(2, 2);
        string font = SansFont.Value;
        for (int panel = 0; panel < Panels.Count; panel++)
        {
            var plot = figure.GetPlot(panel);
            plot.Font.Set(font);
            plot.Title(Panels[panel].Title);
            plot.XLabel("iteration");
            bool drawn = false, legend = runs.Count > 1 && panel == 0;
            for (int r = 0; r < runs.Count; r++)
            {
                var (xs, ys) = Series(runs[r].Scalars.Train, Values[panel]);
                ScottPlot.Plottables.Scatter? train = null;
                if (xs.Length == 0) missing.Add($"{runs[r].Label}: no {Panels[panel].Key} values");
                else
                {
                    train = plot.Add.Scatter(xs, ys, Palette.GetColor(r));
                    train.LineWidth = 1.5f;
                    // Few points: markers, or a single logged iteration would draw nothing.
                    train.MarkerSize = xs.Length <= 40 ? 4 : 0;
                    if (legend) train.LegendText = runs[r].Label;
                    drawn = true;
                }
                if (panel != 0 || runs[r].Scalars.Eval.Count == 0) continue;
                var eval = runs[r].Scalars.Eval.OrderBy(e => e.Iter).ToList();
                // One run: eval in the next colour, to tell it from the training loss at a glance; several: the run's colour.
                var color = Palette.GetColor(runs.Count == 1 ? 1 : r);
                var dashed = plot.Add.Scatter(eval.Select(e => (double)e.Iter).ToArray(), eval.Select(e => e.EvalLoss).ToArray(), color);
                dashed.LinePattern = LinePattern.Dashed;
                dashed.LineWidth = 1.5f;
                dashed.MarkerSize = 6;
                dashed.LegendText = runs.Count > 1 ? $"{runs[r].Label} (eval)" : "eval loss";
                if (runs.Count == 1 && train is not null) train.LegendText = "train loss";
                legend = drawn = true;
            }
            if (!drawn) plot.Add.Annotation($"no {Panels[panel].Key} values yet", Alignment.MiddleCenter);
            if (legend) plot.ShowLegend(Alignment.UpperRight);
            else plot.HideLegend();
            if (panel == 1)
                plot.Axes.Left.TickGenerator = new ScottPlot.TickGenerators.NumericAutomatic
                {
                    LabelFormatter = v => v == 0 ? "0" : v.ToString("0.##e+0", CultureInfo.InvariantCulture),
                };
        }
        var image = figure.Render(width, height);
        return new CurvesImage(image.GetImageBytes(ImageFormat.Png), width, height, missing);
    }

    /// <summary>Renders and writes the PNG atomically (a temporary sibling renamed over <paramref name="path"/>).</summary>
    public static CurvesImage Write(string path, IReadOnlyList<CurveRun> runs, int width = DefaultWidth, int height = DefaultHeight)
    {
        var image = Render(runs, width, height);
        IO.AtomicFile.WriteAllBytes(path, image.Png);
        return image;
    }

    /// <summary>x = iteration, y = the value, for the points that have one, in iteration order.</summary>
    private static (double[] Xs, double[] Ys) Series(IReadOnlyList<TrainPoint> points, Func<TrainPoint, double?> value)
    {
        var kept = points.Where(p => value(p) is { } v && double.IsFinite(v)).OrderBy(p => p.Iter).ToList();
        return (kept.Select(p => (double)p.Iter).ToArray(), kept.Select(p => value(p)!.Value).ToArray());
    }

    // ScottPlot's own default resolves to a serif face on Debian; a sans face reads better at small sizes.
    private static readonly Lazy<string> SansFont = new(() =>
    {
        var installed = SkiaSharp.SKFontManager.Default.FontFamilies.ToHashSet(StringComparer.OrdinalIgnoreCase);
        return new[] { "DejaVu Sans", "Liberation Sans", "Arial", "Helvetica", "Noto Sans" }.FirstOrDefault(installed.Contains) ?? Fonts.Default;
    });
}
