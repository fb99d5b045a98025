using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;

namespace VlmTune.Tests.Serving;

/// <summary>
/// A strict reader of Prometheus' text exposition format 0.0.4, written for the tests (independent of the library
/// that writes it). Beyond the grammar it checks what a scraper relies on: every sample belongs to a family declared
/// by <c># TYPE</c> (with <c># HELP</c>) before its first sample, a family's samples form one group, no series appears
/// twice, counters are finite and non-negative, and a histogram's buckets rise in <c>le</c>, are cumulative, and end
/// with <c>+Inf</c> equal to its <c>_count</c>.
/// </summary>
public sealed partial class PrometheusExposition
{
    public sealed record Sample(string Name, IReadOnlyDictionary<string, string> Labels, double Value)
    {
        /// <summary>The labels as one sorted key, e.g. <c>model="tiny",status="200"</c>.</summary>
        public string Key => LabelKey(Labels);
    }

    public sealed class Family(string name, string type, string help)
    {
        public string Name { get; } = name;
        public string Type { get; } = type;
        public string Help { get; } = help;
        public List<Sample> Samples { get; } = [];
    }

    private static readonly string[] Types = ["counter", "gauge", "histogram", "summary", "untyped"];

    [GeneratedRegex("^[a-zA-Z_:][a-zA-Z0-9_:]*$")]
    private static partial Regex MetricName();

    [GeneratedRegex("^[a-zA-Z_][a-zA-Z0-9_]*$")]
    private static partial Regex LabelName();

    [GeneratedRegex(@"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")]
    private static partial Regex Number();

    public Dictionary<string, Family> Families { get; } = [];

    public static PrometheusExposition Parse(string text)
    {
        var e = new PrometheusExposition();
        if (text.Length > 0 && !text.EndsWith('\n')) throw Bad(0, "the exposition does not end with a line feed");
        if (text.Contains('\r')) throw Bad(0, "carriage return in the exposition");
        var declaredHelp = new Dictionary<string, string>();
        var finished = new HashSet<string>();   // families whose group of samples has ended
        var series = new HashSet<string>();
        Family? current = null;
        var lines = text.Split('\n');
        for (int i = 0; i < lines.Length - 1; i++)
        {
            string line = lines[i];
            int n = i + 1;
            if (line.Trim().Length == 0) continue;
            if (line.StartsWith('#'))
            {
                var parts = line.Split(' ', 4);
                if (parts.Length >= 3 && parts[0] == "#" && parts[1] == "HELP")
                {
                    string name = parts[2];
                    if (!MetricName().IsMatch(name)) throw Bad(n, $"bad metric name in HELP: {name}");
                    if (!declaredHelp.TryAdd(name, UnescapeHelp(parts.Length == 4 ? parts[3] : "", n))) throw Bad(n, $"second HELP for {name}");
                    if (e.Families.ContainsKey(name)) throw Bad(n, $"HELP for {name} after its TYPE");
                }
                else if (parts.Length >= 3 && parts[0] == "#" && parts[1] == "TYPE")
                {
                    string name = parts[2];
                    if (parts.Length != 4 || !Types.Contains(parts[3])) throw Bad(n, $"bad TYPE line: {line}");
                    if (e.Families.ContainsKey(name)) throw Bad(n, $"second TYPE for {name}");
                    if (!declaredHelp.TryGetValue(name, out var help)) throw Bad(n, $"TYPE for {name} without a HELP before it");
                    if (current is not null) finished.Add(current.Name);
                    current = new Family(name, parts[3], help);
                    e.Families[name] = current;
                }
                continue;   // any other comment
            }
            var sample = ParseSample(line, n);
            var family = FamilyOf(e, sample.Name) ?? throw Bad(n, $"sample {sample.Name} belongs to no family declared with TYPE");
            if (!ReferenceEquals(family, current))
            {
                if (finished.Contains(family.Name) || current is null) throw Bad(n, $"samples of {family.Name} are not one group");
                throw Bad(n, $"sample {sample.Name} after the TYPE of another family ({current.Name})");
            }
            if (!series.Add(sample.Name + "{" + sample.Key + "}")) throw Bad(n, $"series {sample.Name}{{{sample.Key}}} appears twice");
            if (family.Type == "counter" && !(double.IsFinite(sample.Value) && sample.Value >= 0)) throw Bad(n, $"counter {sample.Name} is {sample.Value}");
            if (family.Type == "histogram" && sample.Name.EndsWith("_bucket") != sample.Labels.ContainsKey("le")) throw Bad(n, $"{sample.Name}: le belongs to buckets and only to them");
            family.Samples.Add(sample);
        }
        foreach (var name in declaredHelp.Keys)
            if (!e.Families.ContainsKey(name)) throw Bad(0, $"HELP for {name} without a TYPE");
        foreach (var family in e.Families.Values.Where(f => f.Type == "histogram")) CheckHistogram(family);
        return e;
    }

    /// <summary>The family a sample name belongs to: itself, or a histogram's (summary's) _bucket, _sum, _count.</summary>
    private static Family? FamilyOf(PrometheusExposition e, string sample)
    {
        if (e.Families.TryGetValue(sample, out var own) && own.Type is not "histogram") return own;
        foreach (var suffix in new[] { "_bucket", "_sum", "_count" })
        {
            if (!sample.EndsWith(suffix, StringComparison.Ordinal)) continue;
            if (e.Families.TryGetValue(sample[..^suffix.Length], out var f) && (f.Type == "histogram" || (f.Type == "summary" && suffix != "_bucket"))) return f;
        }
        return null;
    }

    private static void CheckHistogram(Family f)
    {
        foreach (var group in f.Samples.GroupBy(s => LabelKey(s.Labels.Where(l => l.Key != "le"))))
        {
            string where = $"{f.Name}{{{group.Key}}}";
            var buckets = group.Where(s => s.Name == f.Name + "_bucket").Select(s => (Le: ParseValue(s.Labels["le"], 0), s.Value)).ToList();
            var count = group.SingleOrDefault(s => s.Name == f.Name + "_count") ?? throw Bad(0, $"{where} has no _count");
            var sum = group.SingleOrDefault(s => s.Name == f.Name + "_sum") ?? throw Bad(0, $"{where} has no _sum");
            if (buckets.Count == 0) throw Bad(0, $"{where} has no buckets");
            for (int i = 1; i < buckets.Count; i++)
            {
                if (!(buckets[i].Le > buckets[i - 1].Le)) throw Bad(0, $"{where}: bucket le={buckets[i].Le} does not follow le={buckets[i - 1].Le}");
                if (buckets[i].Value < buckets[i - 1].Value) throw Bad(0, $"{where}: buckets are not cumulative at le={buckets[i].Le}");
            }
            if (!double.IsPositiveInfinity(buckets[^1].Le)) throw Bad(0, $"{where}: the last bucket is not +Inf");
            if (buckets[^1].Value != count.Value) throw Bad(0, $"{where}: +Inf bucket {buckets[^1].Value} != _count {count.Value}");
            if (!(count.Value >= 0 && double.IsFinite(sum.Value))) throw Bad(0, $"{where}: _count {count.Value}, _sum {sum.Value}");
        }
    }

    private static Sample ParseSample(string line, int n)
    {
        int i = 0;
        while (i < line.Length && line[i] != '{' && line[i] != ' ') i++;
        string name = line[..i];
        if (!MetricName().IsMatch(name)) throw Bad(n, $"bad metric name: {line}");
        var labels = new Dictionary<string, string>();
        if (i < line.Length && line[i] == '{')
        {
            i++;
            while (true)
            {
                if (i < line.Length && line[i] == '}') { i++; break; }
                int start = i;
                while (i < line.Length && line[i] != '=') i++;
                string label = line[start..i];
                if (!LabelName().IsMatch(label) || label.StartsWith("__")) throw Bad(n, $"bad label name '{label}': {line}");
                if (i + 1 >= line.Length || line[i + 1] != '"') throw Bad(n, $"label {label} without a quoted value: {line}");
                i += 2;
                var value = new StringBuilder();
                while (true)
                {
                    if (i >= line.Length) throw Bad(n, $"unterminated label value: {line}");
                    char c = line[i++];
                    if (c == '"') break;
                    if (c != '\\') { value.Append(c); continue; }
                    if (i >= line.Length) throw Bad(n, $"dangling escape: {line}");
                    value.Append(line[i++] switch { '\\' => '\\', '"' => '"', 'n' => '\n', var x => throw Bad(n, $"bad escape \\{x}: {line}") });
                }
                if (!labels.TryAdd(label, value.ToString())) throw Bad(n, $"label {label} twice: {line}");
                if (i < line.Length && line[i] == ',') { i++; continue; }
                if (i < line.Length && line[i] == '}') { i++; break; }
                throw Bad(n, $"expected , or }} after a label: {line}");
            }
        }
        if (i >= line.Length || line[i] != ' ') throw Bad(n, $"no value: {line}");
        var rest = line[(i + 1)..].Split(' ');
        if (rest.Length is < 1 or > 2) throw Bad(n, $"expected a value and at most a timestamp: {line}");
        double v = ParseValue(rest[0], n);
        if (rest.Length == 2 && !long.TryParse(rest[1], NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out _)) throw Bad(n, $"bad timestamp: {line}");
        return new Sample(name, labels, v);
    }

    private static double ParseValue(string s, int n) => s switch
    {
        "+Inf" => double.PositiveInfinity,
        "-Inf" => double.NegativeInfinity,
        "NaN" => double.NaN,
        _ when Number().IsMatch(s) => double.Parse(s, NumberStyles.Float, CultureInfo.InvariantCulture),
        _ => throw Bad(n, $"bad number '{s}'"),
    };

    private static string UnescapeHelp(string s, int n)
    {
        var sb = new StringBuilder();
        for (int i = 0; i < s.Length; i++)
        {
            if (s[i] != '\\') { sb.Append(s[i]); continue; }
            if (++i >= s.Length) throw Bad(n, "dangling escape in HELP");
            sb.Append(s[i] switch { '\\' => '\\', 'n' => '\n', var x => throw Bad(n, $"bad escape \\{x} in HELP") });
        }
        return sb.ToString();
    }

    private static string LabelKey(IEnumerable<KeyValuePair<string, string>> labels) =>
        string.Join(",", labels.OrderBy(l => l.Key, StringComparer.Ordinal).Select(l => $"{l.Key}=\"{l.Value}\""));

    private static FormatException Bad(int line, string message) => new(line > 0 ? $"line {line}: {message}" : message);

    // ------------------------------------------------------------------ reading values

    /// <summary>
    /// The value of the series <paramref name="name"/> whose labels are exactly <paramref name="labels"/>
    /// (<c>"model=tiny"</c>, …); 0 when the series does not exist (a labelled series appears with its first event).
    /// </summary>
    public double Value(string name, params string[] labels)
    {
        var wanted = LabelKey(labels.Select(l => l.Split('=', 2)).Select(p => new KeyValuePair<string, string>(p[0], p[1])));
        var family = FamilyOf(this, name) ?? throw new KeyNotFoundException($"no family for {name}");
        return family.Samples.SingleOrDefault(s => s.Name == name && s.Key == wanted)?.Value ?? 0;
    }

    /// <summary>The sum over every series of <paramref name="name"/> whose labels include <paramref name="labels"/>.</summary>
    public double Sum(string name, params string[] labels)
    {
        var family = FamilyOf(this, name) ?? throw new KeyNotFoundException($"no family for {name}");
        var pairs = labels.Select(l => l.Split('=', 2)).ToList();
        return family.Samples.Where(s => s.Name == name && pairs.All(p => s.Labels.TryGetValue(p[0], out var v) && v == p[1])).Sum(s => s.Value);
    }

    /// <summary>
    /// Between two scrapes nothing that only grows has shrunk or vanished: counters, and histograms' buckets, counts
    /// and sums (every value they observe is ≥ 0).
    /// </summary>
    public static void AssertNeverDecreases(PrometheusExposition before, PrometheusExposition after)
    {
        foreach (var family in before.Families.Values.Where(f => f.Type is "counter" or "histogram"))
        {
            Assert.True(after.Families.TryGetValue(family.Name, out var later), $"{family.Name} vanished");
            var now = later!.Samples.ToDictionary(s => s.Name + "{" + s.Key + "}", s => s.Value);
            foreach (var s in family.Samples)
            {
                string id = s.Name + "{" + s.Key + "}";
                Assert.True(now.TryGetValue(id, out var v), $"{id} vanished");
                Assert.True(v >= s.Value, $"{id} went down from {s.Value} to {v}");
            }
        }
    }
}
