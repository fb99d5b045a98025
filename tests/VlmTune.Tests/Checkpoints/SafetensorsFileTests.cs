using System.Text;
using VlmTune.Checkpoints;
using VlmTune.Tests.Support;
using static TorchSharp.torch;

namespace VlmTune.Tests.Checkpoints;

public class SafetensorsFileTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("vlmtune-st-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [FixtureFact]
    public void ReadsTheTinyCheckpointLazily()
    {
        using var file = SafetensorsFile.Open(Path.Combine(Fixtures.TinyModel, "model.safetensors"));
        Assert.Equal(55, file.Entries.Count);
        using var t = file.Read("mlp1.1.weight");
        Assert.Equal(new long[] { 64, 256 }, t.shape);
        Assert.Equal(ScalarType.BFloat16, t.dtype);
    }

    [Fact]
    public void ReadsValuesOfEveryDType()
    {
        var path = Write("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I64","shape":[1],"data_offsets":[8,16]},"__metadata__":{"format":"pt"}}""",
            [.. BitConverter.GetBytes(1.5f), .. BitConverter.GetBytes(-2f), .. BitConverter.GetBytes(42L)]);
        using var file = SafetensorsFile.Open(path);
        Assert.Equal(new[] { 1.5f, -2f }, file.Read("a").data<float>().ToArray());
        Assert.Equal(42L, file.Read("b").item<long>());
        Assert.Equal("pt", file.Metadata["format"]);
    }

    [Theory]
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}""", 12, "starts at byte 4, expected 0")]
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}""", 8, "expected 8")]
    [InlineData("""{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}""", 8, "spans 8 bytes")]
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""", 4, "truncated")]
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""", 12, "bytes after the last tensor")]
    [InlineData("""{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}}""", 8, "overflows")]
    [InlineData("""{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}""", 8, "unsupported dtype")]
    [InlineData("""[1,2]""", 0, "expected a JSON object")]
    [InlineData("""{"a":""", 0, "invalid JSON")]
    public void RejectsCorruptHeadersWithTheFileAndReason(string header, int dataBytes, string reason)
    {
        var path = Write(header, new byte[dataBytes]);
        var e = Assert.Throws<CheckpointException>(() => SafetensorsFile.Open(path));
        Assert.Contains(path, e.Message);
        Assert.Contains(reason, e.Message);
    }

    [Fact]
    public void RejectsBadSizesAndEncodings()
    {
        var tiny = Path.Combine(_dir, "short.safetensors");
        File.WriteAllBytes(tiny, [1, 2, 3]);
        Assert.Contains("at least 8", Assert.Throws<CheckpointException>(() => SafetensorsFile.Open(tiny)).Message);

        var huge = Path.Combine(_dir, "huge.safetensors");
        File.WriteAllBytes(huge, BitConverter.GetBytes(200_000_000UL));
        Assert.Contains("exceeds", Assert.Throws<CheckpointException>(() => SafetensorsFile.Open(huge)).Message);

        var cut = Path.Combine(_dir, "cut.safetensors");
        File.WriteAllBytes(cut, [.. BitConverter.GetBytes(1000UL), .. "{}"u8.ToArray()]);
        Assert.Contains("truncated", Assert.Throws<CheckpointException>(() => SafetensorsFile.Open(cut)).Message);

        var latin = Path.Combine(_dir, "latin.safetensors");
        byte[] bad = [(byte)'{', 0xff, (byte)'}'];
        File.WriteAllBytes(latin, [.. BitConverter.GetBytes((ulong)bad.Length), .. bad]);
        Assert.Contains("UTF-8", Assert.Throws<CheckpointException>(() => SafetensorsFile.Open(latin)).Message);
    }

    /// <summary>
    /// Random mutations of a valid file (bit flips, truncations, header-size edits, JSON splices) must either open and
    /// read consistently or fail with a <see cref="CheckpointException"/> — never another exception, hang or crash.
    /// </summary>
    [Fact]
    public void FuzzedFilesOpenCleanlyOrFailWithCheckpointException()
    {
        string header = """{"w":{"dtype":"BF16","shape":[3,2],"data_offsets":[0,12]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]},"__metadata__":{"format":"pt"}}""";
        byte[] valid = Build(header, new byte[20]);
        var rng = new Random(1234);
        var path = Path.Combine(_dir, "fuzz.safetensors");
        int opened = 0, rejected = 0;
        for (int i = 0; i < 3000; i++)
        {
            byte[] mutated = Mutate(valid, header, rng);
            File.WriteAllBytes(path, mutated);
            try
            {
                using var f = SafetensorsFile.Open(path);
                foreach (var name in f.Entries.Keys) using (f.Read(name)) { }
                opened++;
            }
            catch (CheckpointException) { rejected++; }
        }
        Assert.True(opened > 0 && rejected > 0, $"opened {opened}, rejected {rejected}");
    }

    private static byte[] Mutate(byte[] valid, string header, Random rng)
    {
        var b = (byte[])valid.Clone();
        switch (rng.Next(5))
        {
            case 0:
                for (int k = rng.Next(1, 4); k > 0; k--) b[rng.Next(b.Length)] ^= (byte)(1 << rng.Next(8));
                return b;
            case 1:
                return b[..rng.Next(b.Length)];
            case 2:
                BitConverter.GetBytes((ulong)rng.NextInt64(0, 400)).CopyTo(b, 0);
                return b;
            case 3:
                var h = new StringBuilder(header);
                int at = rng.Next(h.Length);
                h.Remove(at, Math.Min(rng.Next(1, 6), h.Length - at)).Insert(at, "0123456789,:[]{}\"-e."[rng.Next(20)]);
                return Build(h.ToString(), new byte[20]);
            default:
                return Build(header, new byte[rng.Next(0, 40)]);
        }
    }

    private static byte[] Build(string header, byte[] data)
    {
        var h = Encoding.UTF8.GetBytes(header);
        return [.. BitConverter.GetBytes((ulong)h.Length), .. h, .. data];
    }

    private string Write(string header, byte[] data)
    {
        var path = Path.Combine(_dir, $"{Guid.NewGuid():N}.safetensors");
        File.WriteAllBytes(path, Build(header, data));
        return path;
    }
}
