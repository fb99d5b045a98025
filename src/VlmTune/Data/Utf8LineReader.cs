using System.Buffers;
using System.Text;

namespace VlmTune.Data;

/// <summary>
/// Lines of a UTF-8 file as bytes decoded strictly: a line that is not valid UTF-8 comes back as null text with the
/// offset of its first bad byte, so it is reported by number rather than read with replacement characters.
/// </summary>
internal sealed class Utf8LineReader(Stream stream, string path)
{
    private static readonly UTF8Encoding Strict = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);
    private readonly byte[] _buffer = new byte[1 << 16];
    private readonly ArrayBufferWriter<byte> _line = new();
    private int _start, _end;
    private long _number;
    private bool _eof, _started;

    /// <summary>What to say about a line that is not UTF-8.</summary>
    public static string Problem(int badByte) => $"not valid UTF-8 (byte {badByte + 1} of the line); the file must be UTF-8 text";

    public (long Number, string? Text, int BadByte)? Next()
    {
        _line.Clear();
        while (true)
        {
            if (_start == _end)
            {
                if (_eof) break;
                _end = stream.Read(_buffer, 0, _buffer.Length);
                _start = 0;
                if (_end == 0) { _eof = true; break; }
                if (!_started) { _started = true; SkipByteOrderMark(); }
            }
            int newline = Array.IndexOf(_buffer, (byte)'\n', _start, _end - _start);
            if (newline < 0) { _line.Write(_buffer.AsSpan(_start, _end - _start)); _start = _end; continue; }
            _line.Write(_buffer.AsSpan(_start, newline - _start));
            _start = newline + 1;
            return Decode();
        }
        return _line.WrittenCount > 0 ? Decode() : null;
    }

    private (long, string?, int) Decode()
    {
        _number++;
        var bytes = _line.WrittenSpan;
        if (bytes.Length > 0 && bytes[^1] == (byte)'\r') bytes = bytes[..^1];
        try { return (_number, Strict.GetString(bytes), -1); }
        catch (DecoderFallbackException e) { return (_number, null, e.Index); }
    }

    private void SkipByteOrderMark()
    {
        var head = _buffer.AsSpan(0, _end);
        if (head.StartsWith((ReadOnlySpan<byte>)[0xEF, 0xBB, 0xBF])) _start = 3;
        else if (head.StartsWith((ReadOnlySpan<byte>)[0xFF, 0xFE]) || head.StartsWith((ReadOnlySpan<byte>)[0xFE, 0xFF]))
            throw new VlmTuneException($"{path}: UTF-16 text; save it as UTF-8.");
    }
}
