using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json;
using Spectre.Console;
using VlmTune.Data;

namespace VlmTune.Cli.Commands;

/// <summary><c>vlmtune data convert-oogiri</c> and <c>vlmtune data validate</c>: get training data ready, nothing lost silently.</summary>
internal static class DataCommand
{
    public static Command Create(RuntimeSwitches switches) => new("data", "Convert, validate and browse training data.")
    {
        ConvertOogiri(switches),
        Validate(),
        Browse(),
    };

    private static readonly JsonSerializerOptions SummaryJson = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower, WriteIndented = true,
        Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    };

    /// <summary>The options <c>validate</c> and <c>browse</c> share, and how they become <see cref="ValidationOptions"/>.</summary>
    private sealed class DataOptions
    {
        public readonly Option<DirectoryInfo?> ImageRoot = new("--image-root") { Description = "Folder image paths are relative to; meta files use their own roots. [default: the data file's folder]" };
        public readonly Option<DirectoryInfo?> Model = new("--model") { Description = "Model folder: its tokenizer and config.json measure token lengths." };
        public readonly Option<int?> MaxLength = new("--max-length") { Description = "Maximum tokens per sample (text + image tokens); longer samples are errors (they would be truncated)." };
        public readonly Option<int?> MaxTiles = new("--max-tiles") { Description = "Tiles per image (max_dynamic_patch). [default: the model's config.json, else 12]" };

        public IEnumerable<Option> All => [ImageRoot, Model, MaxLength, MaxTiles];

        public ValidationOptions Bind(ParseResult parse)
        {
            var options = new ValidationOptions { MaxLength = parse.GetValue(MaxLength) };
            if (parse.GetValue(Model) is { } modelDir)
                options = ModelLength.Configure(options, modelDir.FullName);
            if (parse.GetValue(MaxTiles) is { } tiles)
            {
                if (tiles < 1) throw new VlmTuneException($"--max-tiles must be at least 1, got {tiles}");
                options = options with { MaxTiles = tiles };
            }
            if (options.MaxLength is not null && options.Length is null)
                throw new VlmTuneException("--max-length needs --model (its tokenizer counts the tokens)");
            return options;
        }
    }

    private static Command ConvertOogiri(RuntimeSwitches switches)
    {
        var input = new Option<FileInfo>("--input") { Description = "CLoT Oogiri-GO jsonl (e.g. DIR/cn.jsonl); images are read from images/<image>.jpg beside it.", Required = true };
        var output = new Option<FileInfo>("--output") { Description = "Output file: a JSON array (.json) or JSON lines (.jsonl).", Required = true };
        var types = new Option<string[]>("--types")
        {
            Description = "Line types to keep (comma separated or repeated).",
            AllowMultipleArgumentsPerToken = true,
            DefaultValueFactory = _ => ["I2T"],
        };
        var prompt = new Option<string>("--default-prompt")
        {
            Description = "Question for lines whose question is null or empty.",
            DefaultValueFactory = _ => OogiriOptions.DefaultPrompt,
        };
        var report = new Option<FileInfo?>("--report") { Description = "Write every skipped line (line number, reason, detail) to this file." };
        var strict = new Option<bool>("--strict") { Description = "Fail on the first malformed line instead of skipping it." };
        var command = new Command("convert-oogiri", "Convert CLoT Oogiri-GO jsonl to InternVL chat records with image sizes.")
        {
            input, output, types, prompt, report, strict,
        };
        command.SetAction(parse => CliErrors.Run(() =>
        {
            using var stop = StopSignals.Listen("removing the partial output");
            return stop.Run(ct => Convert(parse, ct), $"nothing was written to {parse.GetValue(output)!.FullName}");
        }));
        return command;

        int Convert(ParseResult parse, CancellationToken ct)
        {
            var options = new OogiriOptions
            {
                Types = parse.GetValue(types)!.SelectMany(t => t.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
                    .ToHashSet(StringComparer.Ordinal),
                Prompt = parse.GetValue(prompt)!,
                Strict = parse.GetValue(strict),
                TestPause = switches.TestPause,
            };
            var inputPath = parse.GetValue(input)!.FullName;
            var outputPath = parse.GetValue(output)!.FullName;
            var reportPath = parse.GetValue(report)?.FullName;
            foreach (var (flag, other) in new[] { ("--input", inputPath), ("--output", outputPath) })
                if (reportPath is not null && (IO.RealPath.SameFile(reportPath, other) || IO.RealPath.Of(reportPath) == IO.RealPath.Of(other)))
                    throw new VlmTuneException($"--report {reportPath} is the {flag} file {other}; name another file for the report.");
            var result = WithProgress($"converting {Path.GetFileName(inputPath)}",
                progress => OogiriConverter.Convert(inputPath, outputPath, options, progress, ct));

            Console.WriteLine($"read {result.Read} lines, kept {result.Kept}, skipped {result.Skipped.Count}");
            foreach (var reason in Enum.GetValues<OogiriSkipReason>())
                Console.WriteLine($"  {ReasonName(reason),-14} {result.Count(reason)}");
            Console.WriteLine($"wrote {outputPath}");
            if (reportPath is not null)
            {
                WriteReport(reportPath, inputPath, result);
                Console.WriteLine($"skipped lines listed in {reportPath}");
            }
            return 0;
        }
    }

    private static Command Validate()
    {
        var data = new Option<FileInfo>("--data") { Description = "Training data: InternVL JSON array or JSONL, OpenAI messages JSONL, or an InternVL meta file.", Required = true };
        var shared = new DataOptions();
        var json = new Option<bool>("--json") { Description = "Print the summary as JSON (the facts `data browse` shows) instead of a table." };
        var command = new Command("validate", "Check every sample of training data and print a summary; exit code 1 when any has errors.") { data, json };
        foreach (var option in shared.All) command.Options.Add(option);
        command.SetAction(parse => CliErrors.Run(() =>
        {
            var dataPath = parse.GetValue(data)!.FullName;
            var options = shared.Bind(parse);
            var entries = TrainingData.ReadEntries(dataPath, parse.GetValue(shared.ImageRoot)?.FullName);
            var asJson = parse.GetValue(json);
            var report = asJson ? DataValidator.Validate(entries, options)
                : WithStatus($"validating {Path.GetFileName(dataPath)}", status => DataValidator.Validate(entries, options, status));
            if (asJson) Console.WriteLine(JsonSerializer.Serialize(DataSummary.Of(report, options), SummaryJson));
            else PrintReport(report, options);
            return report.ErrorCount == 0 ? 0 : 1;
        }));
        return command;
    }

    private static Command Browse()
    {
        var data = new Argument<FileInfo>("data") { Description = "Training data or an InternVL meta file (any format `train` reads)." };
        var shared = new DataOptions();
        var port = new Option<int>("--port") { Description = "Port to listen on (0: any free port).", DefaultValueFactory = _ => 8765 };
        var host = new Option<string>("--host") { Description = "Address to bind; the data is only on this machine unless you pass another.", DefaultValueFactory = _ => "127.0.0.1" };
        var command = new Command("browse", "Look at training data in the browser: samples, tiles, token counts, labels, problems and a summary.") { data, port, host };
        foreach (var option in shared.All) command.Options.Add(option);
        command.SetAction((parse, ct) => CliErrors.RunAsync(async () =>
        {
            var options = shared.Bind(parse);
            ListenErrors.ThrowIfUnavailable(parse.GetValue(host)!, parse.GetValue(port));
            using var browser = DatasetBrowser.Open(parse.GetValue(data)!.FullName, parse.GetValue(shared.ImageRoot)?.FullName, options);
            await using var app = Serving.DatasetBrowserServer.Build(browser, parse.GetValue(host)!, parse.GetValue(port));
            using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
            void OnSignal(System.Runtime.InteropServices.PosixSignalContext signal) { signal.Cancel = true; stop.Cancel(); }
            using var sigterm = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGTERM, OnSignal);
            using var sigint = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGINT, OnSignal);
            await ListenErrors.StartAsync(app, parse.GetValue(host)!, parse.GetValue(port));
            Console.WriteLine($"Browsing {browser.Path} on {Serving.VlmTuneServer.Address(app)} (counting the summary in the background). Ctrl-C to stop.");
            try { await Task.Delay(Timeout.Infinite, stop.Token); }
            catch (OperationCanceledException) { }
            await app.StopAsync(CancellationToken.None);
            return 0;
        }));
        return command;
    }

    private static void PrintReport(ValidationReport report, ValidationOptions options)
    {
        var table = new Table().AddColumn("check").AddColumn(new TableColumn("count").RightAligned());
        table.AddRow("records", report.Records.ToString(CultureInfo.InvariantCulture));
        table.AddRow("samples", report.Samples.ToString(CultureInfo.InvariantCulture));
        table.AddRow("images", report.Images.ToString(CultureInfo.InvariantCulture));
        foreach (var kind in Enum.GetValues<DataProblemKind>())
        {
            var n = report.ErrorsByKind.GetValueOrDefault(kind);
            table.AddRow($"errors: {KindName(kind)}", n == 0 ? "0" : $"[red]{n}[/]");
        }
        if (options.Length is not null)
        {
            table.AddRow("samples measured", report.Lengths.Count.ToString(CultureInfo.InvariantCulture));
            table.AddRow("length p50", report.Percentile(50).ToString(CultureInfo.InvariantCulture));
            table.AddRow("length p90", report.Percentile(90).ToString(CultureInfo.InvariantCulture));
            table.AddRow("length p99", report.Percentile(99).ToString(CultureInfo.InvariantCulture));
            table.AddRow("length max", report.Lengths.DefaultIfEmpty().Max().ToString(CultureInfo.InvariantCulture));
            table.AddRow($"would be truncated (> {options.MaxLength?.ToString(CultureInfo.InvariantCulture) ?? "-"})", report.TooLong.ToString(CultureInfo.InvariantCulture));
        }
        else table.AddRow("token lengths", "not measured (pass --model)");
        AnsiConsole.Write(table);
        foreach (var problem in report.Problems)
            Console.WriteLine($"{KindName(problem.Kind)}: {problem}");
        if (report.ErrorCount > report.Problems.Count)
            Console.WriteLine($"... and {report.ErrorCount - report.Problems.Count} more");
        Console.WriteLine(report.ErrorCount == 0 ? "ok: no errors" : $"{report.ErrorCount} error(s)");
    }

    /// <summary>Runs <paramref name="work"/> with a progress bar when stdout is a terminal, plainly otherwise.</summary>
    private static T WithProgress<T>(string label, Func<IProgress<double>?, T> work)
    {
        if (Console.IsOutputRedirected || !AnsiConsole.Profile.Capabilities.Interactive) return work(null);
        T result = default!;
        AnsiConsole.Progress().AutoClear(true).Start(context =>
        {
            var task = context.AddTask(label, maxValue: 1.0);
            result = work(new Progress<double>(fraction => task.Value = fraction));
            task.Value = 1.0;
        });
        return result;
    }

    /// <summary>Runs <paramref name="work"/> with a live record count when stdout is a terminal (the total is unknown while streaming).</summary>
    private static T WithStatus<T>(string label, Func<Action<long>?, T> work)
    {
        if (Console.IsOutputRedirected || !AnsiConsole.Profile.Capabilities.Interactive) return work(null);
        return AnsiConsole.Status().Start(label, context => work(n => context.Status($"{label}: {n:N0} records")));
    }

    private static void WriteReport(string path, string input, OogiriResult result)
    {
        var text = new StringBuilder();
        text.Append("# skipped lines of ").Append(input).Append('\n');
        text.Append("line\treason\tdetail\n");
        foreach (var skip in result.Skipped)
            text.Append(skip.Line.ToString(CultureInfo.InvariantCulture)).Append('\t').Append(ReasonName(skip.Reason)).Append('\t')
                .Append(skip.Detail.ReplaceLineEndings(" ")).Append('\n');
        VlmTune.IO.AtomicFile.WriteAllText(path, text.ToString());   // UTF-8 without BOM
    }

    internal static string ReasonName(OogiriSkipReason reason) => reason switch
    {
        OogiriSkipReason.Type => "type",
        OogiriSkipReason.MissingImage => "missing image",
        OogiriSkipReason.EmptyText => "empty text",
        OogiriSkipReason.ImageOutside => "image outside",
        _ => "bad line",
    };

    private static string KindName(DataProblemKind kind) => kind switch
    {
        DataProblemKind.BadJson => "bad JSON",
        DataProblemKind.BadRecord => "bad record",
        DataProblemKind.PathEscapesRoot => "path escapes root",
        DataProblemKind.RolesNotAlternating => "roles not alternating",
        DataProblemKind.PlaceholderMismatch => "placeholder mismatch",
        DataProblemKind.ImageMissing => "image missing",
        DataProblemKind.ImageUndecodable => "image undecodable",
        DataProblemKind.TooLong => "too long",
        _ => kind.ToString(),
    };
}
