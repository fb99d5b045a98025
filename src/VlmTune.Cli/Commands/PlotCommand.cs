using System.CommandLine;
using VlmTune.Training.Reports;

namespace VlmTune.Cli.Commands;

/// <summary><c>vlmtune plot WORK_DIR_OR_RUN_DIR [-o out.png]</c>: the training curves of one run, or of several side by side.</summary>
internal static class PlotCommand
{
    private static readonly Argument<string> Dir = new("dir") { Description = "A run folder (work_dirs/<name>/<timestamp>), a work dir, or a folder of work dirs: every run found is drawn." };
    private static readonly Option<string?> Output = new("--output", "-o") { Description = "PNG to write. [default: curves.png in the run folder, or in DIR for several runs]" };
    private static readonly Option<int> Width = new("--width") { Description = "Image width in pixels.", DefaultValueFactory = _ => TrainingCurves.DefaultWidth };
    private static readonly Option<int> Height = new("--height") { Description = "Image height in pixels.", DefaultValueFactory = _ => TrainingCurves.DefaultHeight };

    public static Command Create()
    {
        var command = new Command("plot", "Draw loss (and eval loss), learning rate, grad norm and tokens/s of training runs from their vis_data/scalars.json into a PNG.")
        {
            Dir, Output, Width, Height,
        };
        command.SetAction(parse => CliErrors.Run(() => Run(parse)));
        return command;
    }

    private static int Run(ParseResult parse)
    {
        string dir = Path.GetFullPath(parse.GetValue(Dir)!);
        int width = parse.GetValue(Width), height = parse.GetValue(Height);
        if (width is < 200 or > 10000 || height is < 150 or > 10000)
            throw new VlmTuneException($"--width {width} --height {height}: the figure must be between 200×150 and 10000×10000 pixels");
        var found = RunFolders.Find(dir);
        if (found.Count == 0) throw new VlmTuneException($"{dir}: no run folder found (a run folder holds {RunScalars.RelativePath}; looked three levels down)");

        var runs = new List<CurveRun>();
        foreach (var run in found)
        {
            // With several runs, one that has logged nothing yet (just started, or failed while loading) is no reason
            // to draw none; a line that is not what the trainer writes always is.
            if (found.Count > 1 && RunScalars.ReadLenient(run.ScalarsPath) is { IsEmpty: true, Problem: null })
            {
                Console.Error.WriteLine($"warning: {run.ScalarsPath}: no iteration logged yet; {run.Label} left out");
                continue;
            }
            var scalars = RunScalars.Read(run.ScalarsPath);
            if (scalars.PartialLastLine)
                Console.Error.WriteLine($"warning: {run.ScalarsPath}: line {scalars.Lines + 1} has no end (being written, or cut by a kill); left out");
            runs.Add(new CurveRun(run.Label, scalars));
        }
        if (runs.Count == 0) throw new VlmTuneException($"{dir}: none of the {found.Count} runs has logged an iteration yet");

        string output = parse.GetValue(Output) is { } o ? Path.GetFullPath(o)
            : Path.Combine(found is [{ } single] ? single.Dir : dir, TrainingCurves.FileName);
        if (Path.GetDirectoryName(output) is { } parent && !Directory.Exists(parent))
            throw new VlmTuneException($"-o {output}: the folder {parent} does not exist");
        var image = TrainingCurves.Write(output, runs, width, height);
        foreach (var missing in image.Missing) Console.Error.WriteLine($"warning: {missing}");
        Console.WriteLine($"wrote {output} ({runs.Count} run{(runs.Count == 1 ? "" : "s")}, {string.Join(", ", runs.Select(r => $"{r.Label}: {r.Scalars.Train.Count} iterations logged{(r.Scalars.Eval.Count > 0 ? $", {r.Scalars.Eval.Count} evaluations" : "")}"))})");
        return 0;
    }
}
