namespace VlmTune.Vision;

/// <summary>
/// Pillow's <c>Image.resize(size, Image.BICUBIC)</c> (no reducing_gap) for 8-bit RGB, reproduced integer for integer:
/// the separable two-pass convolution of libImaging/Resample.c. Coefficients are computed in double with the
/// antialiasing support (filter support × scale when downscaling), normalised to sum 1, converted to fixed point with
/// 22 fractional bits, and each pass accumulates in int32 from a rounding bias of ½ before clipping to 0..255.
/// The horizontal pass runs first, over only the source rows the vertical pass will read.
/// Matching Pillow exactly matters because the model was trained on Pillow's pixels.
/// </summary>
public static class PilResize
{
    private const int PrecisionBits = 32 - 8 - 2;
    private const double BicubicSupport = 2.0;

    /// <summary>Resizes <paramref name="src"/> to width × height with Pillow's antialiased bicubic filter.</summary>
    public static RgbImage Resize(RgbImage src, int width, int height)
    {
        if (width < 1 || height < 1) throw new ArgumentOutOfRangeException(nameof(width), $"Target size must be at least 1x1, got {width}x{height}.");
        // Pillow: same size and full box → a plain copy.
        if (width == src.Width && height == src.Height) return src.Clone();

        bool needHorizontal = width != src.Width;
        bool needVertical = height != src.Height;
        var vertical = Coefficients.Compute(src.Height, height);

        // Only rows [firstRow, lastRow) of the source feed the vertical pass.
        int firstRow = vertical.Bounds[0];
        int lastRow = vertical.Bounds[2 * (height - 1)] + vertical.Bounds[2 * (height - 1) + 1];

        RgbImage current = src;
        if (needHorizontal)
        {
            var horizontal = Coefficients.Compute(src.Width, width);
            for (int i = 0; i < height; i++) vertical.Bounds[2 * i] -= firstRow;
            current = ResampleHorizontal(src, width, firstRow, lastRow - firstRow, horizontal);
        }
        if (needVertical) current = ResampleVertical(current, height, vertical);
        return current;
    }

    private static RgbImage ResampleHorizontal(RgbImage src, int outWidth, int rowOffset, int rows, Coefficients c)
    {
        var dst = new RgbImage(outWidth, rows);
        byte[] sp = src.Pixels, dp = dst.Pixels;
        int srcStride = src.Stride, ksize = c.KernelSize;
        int[] bounds = c.Bounds, k = c.Fixed;
        Parallel.For(0, rows, ParallelOptionsFor(rows * outWidth), yy =>
        {
            int rowStart = (yy + rowOffset) * srcStride;
            int o = yy * outWidth * 3;
            for (int xx = 0; xx < outWidth; xx++, o += 3)
            {
                int xmin = bounds[2 * xx], xcount = bounds[2 * xx + 1], kOff = xx * ksize;
                int s0 = 1 << (PrecisionBits - 1), s1 = s0, s2 = s0;
                int p = rowStart + xmin * 3;
                for (int x = 0; x < xcount; x++, p += 3)
                {
                    int w = k[kOff + x];
                    s0 += sp[p] * w;
                    s1 += sp[p + 1] * w;
                    s2 += sp[p + 2] * w;
                }
                dp[o] = Clip8(s0);
                dp[o + 1] = Clip8(s1);
                dp[o + 2] = Clip8(s2);
            }
        });
        return dst;
    }

    private static RgbImage ResampleVertical(RgbImage src, int outHeight, Coefficients c)
    {
        int width = src.Width, stride = src.Stride, ksize = c.KernelSize;
        var dst = new RgbImage(width, outHeight);
        byte[] sp = src.Pixels, dp = dst.Pixels;
        int[] bounds = c.Bounds, k = c.Fixed;
        Parallel.For(0, outHeight, ParallelOptionsFor(outHeight * width), yy =>
        {
            int ymin = bounds[2 * yy], ycount = bounds[2 * yy + 1], kOff = yy * ksize;
            // Row-wise accumulation (integer sums, so the order does not change the result) keeps reads sequential.
            var acc = new int[stride];
            acc.AsSpan().Fill(1 << (PrecisionBits - 1));
            for (int y = 0; y < ycount; y++)
            {
                int w = k[kOff + y];
                var row = sp.AsSpan((ymin + y) * stride, stride);
                for (int i = 0; i < stride; i++) acc[i] += row[i] * w;
            }
            var outRow = dp.AsSpan(yy * stride, stride);
            for (int i = 0; i < stride; i++) outRow[i] = Clip8(acc[i]);
        });
        return dst;
    }

    /// <summary>Pillow's clip8: drop the fraction bits (arithmetic shift) and clamp to a byte.</summary>
    private static byte Clip8(int value)
    {
        int v = value >> PrecisionBits;
        return v < 0 ? (byte)0 : v > 255 ? (byte)255 : (byte)v;
    }

    // Small images are not worth the thread hand-off.
    private static ParallelOptions ParallelOptionsFor(long outputPixels) =>
        new() { MaxDegreeOfParallelism = outputPixels < 64 * 1024 ? 1 : Environment.ProcessorCount };

    private static double Bicubic(double x)
    {
        const double a = -0.5;
        if (x < 0.0) x = -x;
        if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
        if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
        return 0.0;
    }

    /// <summary>Per output pixel: first source index and tap count (Bounds, pairs) and fixed-point taps (KernelSize each).</summary>
    internal sealed class Coefficients
    {
        public required int KernelSize { get; init; }
        public required int[] Bounds { get; init; }
        public required double[] Weights { get; init; }
        public required int[] Fixed { get; init; }

        /// <summary>Pillow's precompute_coeffs over the whole axis (box 0..inSize) then normalize_coeffs_8bpc.</summary>
        public static Coefficients Compute(int inSize, int outSize)
        {
            // Pillow passes the box edges as C floats; whole pixel sizes are exact in float.
            float in0 = 0f, in1 = inSize;
            double scale = (double)(in1 - in0) / outSize;
            double filterScale = scale < 1.0 ? 1.0 : scale;
            double support = BicubicSupport * filterScale;
            int ksize = (int)Math.Ceiling(support) * 2 + 1;

            var bounds = new int[outSize * 2];
            var weights = new double[outSize * ksize];
            for (int xx = 0; xx < outSize; xx++)
            {
                double center = in0 + (xx + 0.5) * scale;
                double sum = 0.0;
                double ss = 1.0 / filterScale;
                int xmin = (int)(center - support + 0.5); // C cast: truncation toward zero
                if (xmin < 0) xmin = 0;
                int xmax = (int)(center + support + 0.5);
                if (xmax > inSize) xmax = inSize;
                xmax -= xmin;
                int off = xx * ksize;
                for (int x = 0; x < xmax; x++)
                {
                    double w = Bicubic((x + xmin - center + 0.5) * ss);
                    weights[off + x] = w;
                    sum += w;
                }
                if (sum != 0.0)
                    for (int x = 0; x < xmax; x++) weights[off + x] /= sum;
                bounds[2 * xx] = xmin;
                bounds[2 * xx + 1] = xmax;
            }

            var fixedPoint = new int[weights.Length];
            for (int i = 0; i < weights.Length; i++)
                fixedPoint[i] = weights[i] < 0
                    ? (int)(-0.5 + weights[i] * (1 << PrecisionBits))
                    : (int)(0.5 + weights[i] * (1 << PrecisionBits));
            return new Coefficients { KernelSize = ksize, Bounds = bounds, Weights = weights, Fixed = fixedPoint };
        }
    }
}
