namespace VlmTune.Vision;

/// <summary>
/// Iteration order of a CPython (3.8+) set of small (int, int) tuples built by adding items in order: the tuple hash
/// (xxHash-style, tupleobject.c) and the open-addressing table of setobject.c (linear probes of 9, then perturbed
/// jumps; resized ×4 once 60% full). Needed only to break exact ties in the tile grid choice the way the official code does.
/// </summary>
internal static class PythonSetOrder
{
    private const ulong Prime1 = 11400714785074694791UL;
    private const ulong Prime2 = 14029467366897019727UL;
    private const ulong Prime5 = 2870177450012600261UL;
    private const int LinearProbes = 9;
    private const int PerturbShift = 5;
    private const int MinSize = 8;

    public static List<(int, int)> Iterate(IEnumerable<(int, int)> items)
    {
        var table = new (int, int)?[MinSize];
        var hashes = new ulong[MinSize];
        int used = 0;
        foreach (var item in items)
        {
            ulong hash = TupleHash(item.Item1, item.Item2);
            if (!Add(table, hashes, item, hash)) continue;
            used++;
            ulong mask = (ulong)table.Length - 1;
            if ((ulong)used * 5 < mask * 3) continue; // no deletions, so fill == used
            (table, hashes) = Resize(table, hashes, used > 50000 ? used * 2 : used * 4);
        }
        var result = new List<(int, int)>(used);
        foreach (var entry in table) if (entry is { } e) result.Add(e);
        return result;
    }

    private static bool Add((int, int)?[] table, ulong[] hashes, (int, int) item, ulong hash)
    {
        ulong mask = (ulong)table.Length - 1, perturb = hash, i = hash & mask;
        while (true)
        {
            int probes = i + LinearProbes <= mask ? LinearProbes : 0;
            ulong j = i;
            do
            {
                if (table[j] is null)
                {
                    table[j] = item;
                    hashes[j] = hash;
                    return true;
                }
                if (hashes[j] == hash && table[j]!.Value == item) return false;
                j++;
            } while (probes-- > 0);
            perturb >>= PerturbShift;
            i = (i * 5 + 1 + perturb) & mask;
        }
    }

    private static ((int, int)?[], ulong[]) Resize((int, int)?[] old, ulong[] oldHashes, int minUsed)
    {
        int size = MinSize;
        while (size <= minUsed) size <<= 1;
        var table = new (int, int)?[size];
        var hashes = new ulong[size];
        ulong mask = (ulong)size - 1;
        for (int k = 0; k < old.Length; k++)
        {
            if (old[k] is not { } item) continue;
            ulong hash = oldHashes[k], perturb = hash, i = hash & mask;
            while (true)
            {
                if (table[i] is null) break;
                bool placed = false;
                if (i + LinearProbes <= mask)
                    for (int p = 1; p <= LinearProbes; p++)
                        if (table[i + (ulong)p] is null) { i += (ulong)p; placed = true; break; }
                if (placed) break;
                perturb >>= PerturbShift;
                i = (i * 5 + 1 + perturb) & mask;
            }
            table[i] = item;
            hashes[i] = hash;
        }
        return (table, hashes);
    }

    /// <summary>hash((a, b)) of CPython ≥ 3.8 on 64-bit, where a small non-negative int hashes to itself.</summary>
    internal static ulong TupleHash(int a, int b)
    {
        ulong acc = Prime5;
        foreach (ulong lane in new[] { (ulong)a, (ulong)b })
        {
            acc += lane * Prime2;
            acc = (acc << 31) | (acc >> 33);
            acc *= Prime1;
        }
        acc += 2UL ^ (Prime5 ^ 3527539UL);
        return acc == ulong.MaxValue ? 1546275796UL : acc;
    }
}
