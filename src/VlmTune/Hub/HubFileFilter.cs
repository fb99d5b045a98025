using System.Text;
using System.Text.RegularExpressions;

namespace VlmTune.Hub;

/// <summary>
/// <c>--include</c>/<c>--exclude</c> patterns as huggingface_hub applies them: shell globs matched against the whole
/// repo path (fnmatch: <c>*</c> also crosses <c>/</c>), a pattern ending in <c>/</c> means everything under that folder.
/// A file is kept when it matches some include (or none is given) and no exclude.
/// </summary>
internal sealed class HubFileFilter
{
    private readonly Regex[] _include;
    private readonly Regex[] _exclude;

    public HubFileFilter(IReadOnlyList<string>? include, IReadOnlyList<string>? exclude)
    {
        _include = (include ?? []).Select(ToRegex).ToArray();
        _exclude = (exclude ?? []).Select(ToRegex).ToArray();
    }

    public bool IsEmpty => _include.Length == 0 && _exclude.Length == 0;

    public bool Keeps(string path) =>
        (_include.Length == 0 || _include.Any(r => r.IsMatch(path))) && !_exclude.Any(r => r.IsMatch(path));

    private static Regex ToRegex(string glob)
    {
        if (glob.EndsWith('/')) glob += "*";
        var re = new StringBuilder("^");
        for (var i = 0; i < glob.Length; i++)
        {
            var c = glob[i];
            var close = c == '[' ? glob.IndexOf(']', i + 2) : -1;
            if (c == '*') re.Append(".*");
            else if (c == '?') re.Append('.');
            else if (close > 0)
            {
                var set = glob[(i + 1)..close];
                re.Append('[').Append(set.StartsWith('!') ? "^" + Regex.Escape(set[1..]) : Regex.Escape(set)).Append(']');
                i = close;
            }
            else re.Append(Regex.Escape(c.ToString()));
        }
        return new Regex(re.Append('$').ToString(), RegexOptions.CultureInvariant | RegexOptions.Singleline);
    }
}
