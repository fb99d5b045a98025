using VlmTune.Tests.Support;
using VlmTune.Vision;

namespace VlmTune.Tests.Vision;

public class DynamicPreprocessTests
{
    // Expected orders printed by CPython 3.11 for the official expression
    // sorted({(i, j) for n in range(min, max + 1) for i in range(1, n + 1) for j in range(1, n + 1)
    //         if i * j <= max and i * j >= min}, key=lambda x: x[0] * x[1]).
    [Theory]
    [InlineData(1, 12, "1x1 1x2 2x1 3x1 1x3 2x2 4x1 1x4 5x1 1x5 1x6 6x1 3x2 2x3 7x1 1x7 4x2 2x4 1x8 8x1 1x9 3x3 9x1 2x5 5x2 10x1 1x10 11x1 1x11 12x1 3x4 4x3 1x12 6x2 2x6")]
    [InlineData(2, 6, "1x2 2x1 3x1 1x3 4x1 1x4 2x2 1x5 5x1 6x1 2x3 1x6 3x2")]
    [InlineData(3, 12, "3x1 1x3 2x2 4x1 1x4 5x1 1x5 1x6 6x1 3x2 2x3 7x1 1x7 4x2 2x4 1x8 8x1 1x9 3x3 9x1 2x5 5x2 10x1 1x10 11x1 1x11 12x1 3x4 4x3 1x12 6x2 2x6")]
    [InlineData(2, 2, "1x2 2x1")]
    [InlineData(4, 9, "1x4 2x2 4x1 1x5 5x1 6x1 2x3 1x6 3x2 7x1 1x7 2x4 8x1 1x8 4x2 3x3 9x1 1x9")]
    [InlineData(1, 40, "1x1 1x2 2x1 3x1 1x3 2x2 4x1 1x4 5x1 1x5 6x1 3x2 2x3 1x6 7x1 1x7 4x2 2x4 1x8 8x1 9x1 3x3 1x9 1x10 5x2 10x1 2x5 1x11 11x1 6x2 1x12 2x6 12x1 3x4 4x3 13x1 1x13 14x1 1x14 7x2 2x7 1x15 5x3 3x5 15x1 8x2 16x1 4x4 1x16 2x8 1x17 17x1 18x1 3x6 9x2 1x18 6x3 2x9 1x19 19x1 20x1 5x4 2x10 1x20 4x5 10x2 7x3 1x21 3x7 21x1 2x11 11x2 22x1 1x22 1x23 23x1 1x24 24x1 6x4 3x8 4x6 2x12 8x3 12x2 5x5 1x25 25x1 1x26 2x13 13x2 26x1 9x3 27x1 3x9 1x27 1x28 7x4 14x2 2x14 4x7 28x1 29x1 1x29 3x10 15x2 1x30 2x15 10x3 5x6 30x1 6x5 1x31 31x1 8x4 1x32 4x8 32x1 16x2 2x16 1x33 33x1 3x11 11x3 34x1 17x2 2x17 1x34 35x1 1x35 7x5 5x7 4x9 6x6 3x12 18x2 12x3 36x1 1x36 9x4 2x18 37x1 1x37 19x2 2x19 38x1 1x38 3x13 13x3 1x39 39x1 1x40 2x20 40x1 4x10 20x2 8x5 5x8 10x4")]
    [InlineData(5, 30, "5x1 1x5 6x1 3x2 2x3 1x6 7x1 1x7 4x2 2x4 1x8 8x1 9x1 3x3 1x9 1x10 5x2 10x1 2x5 1x11 11x1 6x2 1x12 2x6 12x1 3x4 4x3 13x1 1x13 14x1 1x14 7x2 2x7 1x15 5x3 3x5 15x1 8x2 16x1 4x4 1x16 2x8 1x17 17x1 18x1 3x6 9x2 1x18 6x3 2x9 1x19 19x1 20x1 5x4 2x10 1x20 4x5 10x2 7x3 1x21 3x7 21x1 2x11 11x2 22x1 1x22 1x23 23x1 1x24 24x1 6x4 3x8 4x6 2x12 8x3 12x2 5x5 1x25 25x1 1x26 2x13 13x2 26x1 9x3 27x1 3x9 1x27 1x28 7x4 14x2 2x14 4x7 28x1 29x1 1x29 3x10 15x2 1x30 2x15 10x3 5x6 30x1 6x5")]
    public void TargetRatiosFollowTheOfficialOrder(int minNum, int maxNum, string expected)
    {
        var ratios = DynamicPreprocess.TargetRatios(minNum, maxNum);
        Assert.Equal(expected, string.Join(" ", ratios.Select(r => $"{r.Columns}x{r.Rows}")));
    }

    [Fact]
    public void TupleHashIsCPythons()
    {
        // hash((1, 2)) and hash((2, 1)) on 64-bit CPython >= 3.8.
        Assert.Equal(unchecked((ulong)-3550055125485641917L), PythonSetOrder.TupleHash(1, 2));
        Assert.Equal(6794810172467074373UL, PythonSetOrder.TupleHash(2, 1));
    }

    [Fact]
    public void ExactTieKeepsTheFewerTilesForASmallImage()
    {
        // 500x400 (aspect 1.25) with max 6: 1x1 (diff .25) and 3x2 (diff .25) tie exactly; the image (200,000 px) is not
        // larger than half of 3x2 tiles (0.5·448²·6 = 602,112 px), so 1x1 stays: one tile, no thumbnail.
        Assert.Equal(new TileGrid(1, 1, false), DynamicPreprocess.Plan(500, 400, 1, 6));
        // The same aspect with enough pixels takes the later candidate of the tie.
        Assert.Equal(new TileGrid(3, 2, true), DynamicPreprocess.Plan(1000, 800, 1, 6));
        Assert.Equal(7, DynamicPreprocess.CountTiles(1000, 800, 1, 6));
        // 1x1, 2x2 and 3x2 all tie at aspect 1.25; each later one needs area > 0.5·448²·tiles (401,408 and 602,112 px).
        Assert.Equal(new TileGrid(1, 1, false), DynamicPreprocess.Plan(705, 564, 1, 6)); // 397,620 px
        Assert.Equal(new TileGrid(2, 2, true), DynamicPreprocess.Plan(710, 568, 1, 6));  // 403,280 px
        Assert.Equal(new TileGrid(2, 2, true), DynamicPreprocess.Plan(865, 692, 1, 6));  // 598,580 px
        Assert.Equal(new TileGrid(3, 2, true), DynamicPreprocess.Plan(870, 696, 1, 6));  // 605,520 px
    }

    [Fact]
    public void TieBetweenGridsWithTheSameTileCountFollowsPythonSetOrder()
    {
        // min=max=2 leaves 1x2 and 2x1 (set order: 1x2 first); aspect 1.25 is equidistant from 0.5 and 2.
        Assert.Equal(new TileGrid(1, 2, true), DynamicPreprocess.Plan(50, 40, 2, 2));
        Assert.Equal(new TileGrid(2, 1, true), DynamicPreprocess.Plan(1000, 800, 2, 2));
        // min=max=4: Python's set yields 4x1 before 2x2 (lexicographic order would not); aspect 2.5 ties 1.0 and 4.0,
        // so a small image keeps the first (4x1) and a large one takes the second (2x2).
        Assert.Equal(new TileGrid(4, 1, true), DynamicPreprocess.Plan(640, 256, 4, 4));
        Assert.Equal(new TileGrid(2, 2, true), DynamicPreprocess.Plan(1280, 512, 4, 4));
    }

    [Theory]
    [InlineData(640, 480, 12, 4, 3)]
    [InlineData(300, 900, 12, 1, 3)]
    [InlineData(448, 448, 12, 1, 1)]
    [InlineData(60, 45, 12, 4, 3)]
    [InlineData(2000, 100, 12, 12, 1)]
    [InlineData(100, 2000, 6, 1, 6)]
    public void PicksTheClosestGrid(int width, int height, int maxNum, int columns, int rows)
    {
        var grid = DynamicPreprocess.Plan(width, height, 1, maxNum);
        Assert.Equal((columns, rows), (grid.Columns, grid.Rows));
        Assert.Equal(columns * rows + (columns * rows == 1 ? 0 : 1), grid.TileCount);
        Assert.Equal(columns * rows, DynamicPreprocess.CountTiles(width, height, 1, maxNum, useThumbnail: false));
    }

    [Fact]
    public void ApplyCutsRowMajorTilesAndAppendsTheThumbnail()
    {
        // Each pixel encodes its position, so tiles can be traced back to where they were cut.
        var image = new RgbImage(896, 448);
        for (int y = 0; y < 448; y++)
            for (int x = 0; x < 896; x++)
            {
                int i = (y * 896 + x) * 3;
                image.Pixels[i] = (byte)(x < 448 ? 10 : 200);
                image.Pixels[i + 1] = (byte)(y & 0xFF);
                image.Pixels[i + 2] = 77;
            }
        var tiles = DynamicPreprocess.Apply(image, 1, 12);
        Assert.Equal(3, tiles.Count); // 2x1 grid at the original size (no resampling) + thumbnail
        Assert.Equal(10, tiles[0][5, 5].R);
        Assert.Equal(200, tiles[1][5, 5].R);
        Assert.Equal(image.Crop(448, 0, 448, 448).Pixels, tiles[1].Pixels);
        Assert.Equal(PilResize.Resize(image, 448, 448).Pixels, tiles[2].Pixels);
        Assert.All(tiles, t => Assert.Equal((448, 448), (t.Width, t.Height)));
    }

    // 240 random cases (a third placed exactly midway between two grid ratios, so the tie rule and the set order
    // decide), answered by the official find_closest_aspect_ratio/dynamic_preprocess code under CPython 3.11:
    // "width height min_num max_num columns rows".
    private const string OfficialPlans =
        "1519 490 1 7 3 1;1759 308 1 5 5 1;573 1972 1 27 2 7;10304 3864 1 4 3 1;407 1812 3 6 1 5;3434 1182 1 5 3 1;5066" +
        " 3576 3 5 2 2;799 4488 3 8 1 6;489 1688 4 6 1 4;4928 4620 2 22 4 4;2000 671 1 12 6 2;4056 2814 3 19 3 2;5590 2" +
        "150 4 22 5 2;4006 3455 1 5 2 2;4695 2571 1 5 2 1;1152 480 1 20 5 2;498 2537 1 5 1 5;3161 2843 4 22 4 4;403 124" +
        "0 1 23 1 3;2029 3260 1 5 1 2;1363 3680 2 7 1 3;8307 12780 2 6 2 3;1237 680 1 15 5 3;1912 99 1 4 4 1;3836 2192 " +
        "2 6 3 2;4223 443 1 5 5 1;3269 3229 2 27 5 5;904 1808 1 26 2 4;4922 431 1 3 3 1;1240 4396 1 5 1 4;1351 1930 1 2" +
        "0 2 3;4934 2984 1 12 3 2;3999 3818 2 2 1 2;1408 4224 2 21 2 6;1323 4230 4 19 2 6;2964 1201 1 9 4 2;3216 9648 4" +
        " 6 1 4;2914 1826 3 8 3 2;1828 1599 3 23 5 4;9750 11250 1 15 3 4;3869 2124 1 3 2 1;2864 2988 1 15 3 3;1470 2520" +
        " 1 2 1 2;2819 695 2 5 4 1;1633 3917 4 5 1 4;5768 9888 1 22 3 5;1302 1393 4 6 2 2;4840 3813 1 2 1 1;10116 8430 " +
        "4 11 3 3;842 4314 1 1 1 1;1596 1729 4 10 3 3;4175 8350 1 7 1 2;499 2899 1 9 1 6;1072 4357 2 34 2 8;801 1780 1 " +
        "4 1 2;986 4559 1 40 2 9;4247 4348 1 22 4 4;1704 568 3 9 3 1;3705 4602 1 5 2 2;2668 4142 1 4 1 2;10660 10400 3 " +
        "7 2 2;1660 3667 1 18 3 6;3215 3622 1 8 2 2;2744 5488 1 6 1 2;3000 1172 1 2 2 1;1799 772 1 8 4 2;8840 5304 2 12" +
        " 3 2;3452 1604 3 24 6 3;2998 160 1 3 3 1;5830 1590 1 29 7 2;527 925 3 19 3 5;2176 2228 1 1 1 1;6240 4992 1 5 2" +
        " 2;733 2287 1 21 2 6;594 2204 1 7 1 4;1496 1360 1 3 1 1;2779 4531 1 1 1 1;1059 354 2 21 3 1;728 1248 3 4 1 3;1" +
        "687 2376 1 17 3 4;2843 149 2 6 6 1;3430 5880 1 1 1 1;3663 871 3 18 8 2;4473 3221 4 35 7 5;6732 13464 3 9 2 4;2" +
        "848 446 4 10 6 1;2094 3529 1 1 1 1;8120 6960 1 1 1 1;371 3764 3 7 1 7;3653 30 1 5 5 1;1749 954 1 11 4 2;9 2748" +
        " 1 6 1 6;2285 4119 2 5 1 2;736 276 4 7 3 2;342 3228 1 38 2 19;1908 693 1 10 3 1;2618 1848 3 12 3 2;4203 3517 1" +
        " 1 1 1;4132 4657 4 12 3 3;1480 2220 1 2 1 2;4576 416 1 29 11 1;4354 2004 4 6 3 2;7150 2750 2 2 2 1;3882 2066 1" +
        " 6 2 1;1682 1891 1 8 2 2;4144 1776 4 35 7 3;4913 1208 1 2 2 1;2494 4652 1 21 3 6;918 2448 1 4 1 3;2383 4232 4 " +
        "11 2 4;3821 971 1 30 8 2;1645 5640 3 7 1 3;3170 1719 1 18 6 3;740 1162 1 5 1 2;5760 7200 4 15 3 4;4079 3983 1 " +
        "8 2 2;30 4028 2 3 1 3;4248 8496 4 29 3 6;2715 15 2 5 5 1;984 1604 1 13 2 3;2424 1212 4 6 3 2;3507 2255 2 4 2 1" +
        ";423 2340 1 4 1 4;2842 2352 4 7 2 2;3278 4540 1 2 1 2;406 3366 3 4 1 4;1254 2640 2 12 2 4;2816 2309 1 27 5 4;2" +
        "132 3328 1 24 4 6;2852 2480 4 8 2 2;1703 4101 1 2 1 2;2727 3687 2 9 2 3;1056 1408 2 10 2 3;1959 3018 3 5 1 3;3" +
        "382 3137 1 1 1 1;2145 3432 2 8 2 3;4124 4336 3 7 2 2;2221 2036 4 5 2 2;187 204 2 30 5 6;4013 2 2 39 39 1;3836 " +
        "3678 1 34 5 5;1232 1344 1 2 1 1;4518 324 4 9 9 1;4665 308 1 4 4 1;11424 8064 4 8 3 2;577 2461 4 4 1 4;2138 183" +
        "2 3 9 3 3;4374 2916 3 3 1 3;4312 1924 4 11 4 2;3374 2519 3 3 1 3;2184 2016 1 2 1 1;3477 3033 1 11 3 3;2770 344" +
        "6 1 3 1 1;805 1050 1 13 3 4;2554 1589 1 13 3 2;2172 2417 1 15 3 3;5456 5456 1 40 6 6;446 1745 1 7 1 4;425 493 " +
        "1 7 1 1;984 246 1 29 4 1;1520 4300 1 7 1 3;2555 3102 4 6 2 3;432 288 1 15 3 2;1014 4597 1 14 1 5;2529 3543 1 2" +
        "3 3 4;5954 4580 1 6 3 2;3888 249 1 12 12 1;3316 334 4 19 10 1;1915 1532 2 5 2 2;2231 2745 1 12 3 4;2593 2258 3" +
        " 5 2 2;1320 1440 1 6 2 2;3167 2057 1 30 6 4;4068 1499 2 10 5 2;2624 4920 1 23 3 6;648 4194 2 21 1 7;2026 3341 " +
        "1 11 2 3;5475 4380 1 4 2 2;689 1707 1 3 1 3;3662 1419 1 32 5 2;14554 7660 1 7 2 1;2407 2289 3 5 2 2;2082 2133 " +
        "3 14 3 3;1160 1160 1 16 3 3;531 3245 3 8 1 6;4312 1896 1 9 4 2;1220 488 4 6 3 2;331 2406 1 24 1 7;1553 4920 1 " +
        "1 1 1;6798 12360 3 4 1 3;4884 2865 1 1 1 1;2786 1159 1 3 2 1;3780 6300 1 5 1 2;3046 1517 1 14 4 2;1667 258 3 5" +
        " 5 1;7896 3384 2 6 2 1;1341 3259 1 6 1 3;2321 2520 4 17 4 4;8346 8560 2 4 2 2;1616 3201 1 21 3 6;49 3557 4 17 " +
        "1 17;5428 5664 1 8 2 2;424 4519 1 1 1 1;4693 3038 1 6 3 2;1848 2640 4 6 2 3;4019 1617 1 4 2 1;3955 2577 1 1 1 " +
        "1;13776 6560 1 6 2 1;1607 3875 1 40 3 7;3275 4243 1 1 1 1;990 2376 1 23 3 7;2656 965 1 6 3 1;2509 3442 2 37 5 " +
        "7;8772 12384 1 7 2 3;29 4010 2 2 1 2;3755 1472 2 9 3 1;1880 3008 2 8 2 3;4180 334 1 33 13 1;2571 4191 1 2 1 2;" +
        "544 408 1 5 1 1;1079 4030 3 4 1 4;1812 537 1 11 3 1;1998 2960 1 6 2 3;4849 2154 1 14 5 2;3050 302 3 8 8 1;5040" +
        " 12096 1 7 1 2;943 4348 2 6 1 5;4549 4272 1 15 3 3;10314 13752 3 5 2 2;4730 1198 1 24 8 2;3624 1885 1 3 2 1;11" +
        "700 10800 1 3 1 1;277 1816 4 4 1 4;3541 3422 1 20 4 4;6030 13400 3 4 1 3;22 4646 1 1 1 1;4286 2926 1 4 2 2;262" +
        "5 1260 3 9 4 2;1104 116 1 11 10 1;785 522 1 8 3 2";

    [Fact]
    public void MatchesTheOfficialChoiceOnRandomSizes()
    {
        foreach (var line in OfficialPlans.Split(';'))
        {
            var v = line.Split(' ').Select(int.Parse).ToArray();
            var grid = DynamicPreprocess.Plan(v[0], v[1], v[2], v[3]);
            Assert.True((v[4], v[5]) == (grid.Columns, grid.Rows), $"{line}: got {grid.Columns}x{grid.Rows}");
        }
    }

    [Fact]
    public void RejectsInvalidArguments()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => DynamicPreprocess.Plan(0, 10));
        Assert.Throws<ArgumentOutOfRangeException>(() => DynamicPreprocess.Plan(10, 10, 3, 2));
    }
}
