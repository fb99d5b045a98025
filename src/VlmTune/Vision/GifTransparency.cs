namespace VlmTune.Vision;

/// <summary>
/// PIL opens a GIF's first frame as a palette image; <c>convert('RGB')</c> then shows the transparent index (and any
/// canvas outside the frame, filled with that index, else index 0) as its palette colour. Skia instead leaves those
/// pixels transparent black. This reads the first frame's palette and transparent index from the GIF blocks and
/// restores the palette colour wherever Skia produced alpha 0.
/// </summary>
internal static class GifTransparency
{
    public static void RestorePaletteColours(ReadOnlySpan<byte> gif, byte[] rgba)
    {
        if (!TryReadFirstFrame(gif, out var palette, out int fillIndex)) return;
        int offset = fillIndex * 3;
        if (offset + 2 >= palette.Length) return;
        byte r = palette[offset], g = palette[offset + 1], b = palette[offset + 2];
        for (int i = 0; i < rgba.Length; i += 4)
        {
            if (rgba[i + 3] != 0) continue;
            rgba[i] = r; rgba[i + 1] = g; rgba[i + 2] = b;
        }
    }

    /// <summary>The colour table in force for the first image and the index PIL fills transparent/uncovered pixels with.</summary>
    internal static bool TryReadFirstFrame(ReadOnlySpan<byte> gif, out byte[] palette, out int fillIndex)
    {
        palette = [];
        fillIndex = 0;
        if (gif.Length < 13 || gif[0] != 'G' || gif[1] != 'I' || gif[2] != 'F') return false;
        int pos = 13;
        byte screenFlags = gif[10];
        byte[] global = [];
        if ((screenFlags & 0x80) != 0)
        {
            int size = 3 << ((screenFlags & 7) + 1);
            if (pos + size > gif.Length) return false;
            global = gif.Slice(pos, size).ToArray();
            pos += size;
        }
        int? transparent = null;
        while (pos < gif.Length)
        {
            byte block = gif[pos++];
            if (block == 0x21) // extension: label, then sub-blocks
            {
                if (pos >= gif.Length) return false;
                byte label = gif[pos++];
                if (label == 0xF9 && pos + 5 <= gif.Length && gif[pos] >= 4)
                    transparent = (gif[pos + 1] & 1) != 0 ? gif[pos + 4] : null;
                while (pos < gif.Length && gif[pos] != 0) pos += gif[pos] + 1;
                pos++;
            }
            else if (block == 0x2C) // image descriptor of the first frame
            {
                if (pos + 9 > gif.Length) return false;
                byte imageFlags = gif[pos + 8];
                pos += 9;
                palette = global;
                if ((imageFlags & 0x80) != 0)
                {
                    int size = 3 << ((imageFlags & 7) + 1);
                    if (pos + size > gif.Length) return false;
                    palette = gif.Slice(pos, size).ToArray();
                }
                fillIndex = transparent ?? 0;
                return palette.Length > 0;
            }
            else return false;
        }
        return false;
    }
}
