namespace VlmTune.IO;

/// <summary>Small files written to a temporary sibling and renamed, so readers never see a partial file.</summary>
public static class AtomicFile
{
    public static void WriteAllText(string path, string text)
    {
        string temp = OwnedTemporary.Beside(path);
        try
        {
            File.WriteAllText(temp, text);
            File.Move(temp, path, overwrite: true);
        }
        catch
        {
            try { File.Delete(temp); } catch (IOException) { }
            throw;
        }
    }
}
