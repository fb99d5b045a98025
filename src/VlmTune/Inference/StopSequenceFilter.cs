using System.Text;

namespace VlmTune.Inference;

/// <summary>
/// Cuts streamed text at the first stop string. Text that could still become a stop string is held back until the next
/// piece decides it, so a client never sees part of a stop string.
/// </summary>
public sealed class StopSequenceFilter(IReadOnlyList<string> stops)
{
    private readonly string[] _stops = stops.Where(s => s.Length > 0).ToArray();
    private readonly StringBuilder _held = new();

    public bool Stopped { get; private set; }

    /// <summary>The text safe to show now; <see cref="Stopped"/> turns true when a stop string was found (it and what follows are dropped).</summary>
    public string Push(string piece)
    {
        if (Stopped) return "";
        if (_stops.Length == 0) return piece;
        _held.Append(piece);
        var text = _held.ToString();
        int first = -1;
        foreach (var stop in _stops)
        {
            int at = text.IndexOf(stop, StringComparison.Ordinal);
            if (at >= 0 && (first < 0 || at < first)) first = at;
        }
        if (first >= 0)
        {
            Stopped = true;
            _held.Clear();
            return text[..first];
        }
        int hold = 0;
        foreach (var stop in _stops)
            for (int k = Math.Min(stop.Length - 1, text.Length); k > hold; k--)
                if (text.AsSpan(text.Length - k).SequenceEqual(stop.AsSpan(0, k))) { hold = k; break; }
        _held.Clear().Append(text, text.Length - hold, hold);
        return text[..^hold];
    }

    /// <summary>At the end of generation: whatever was held back (it did not become a stop string).</summary>
    public string Flush()
    {
        var rest = _held.ToString();
        _held.Clear();
        return Stopped ? "" : rest;
    }
}
