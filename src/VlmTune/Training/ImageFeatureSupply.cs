using VlmTune.Data;
using VlmTune.Models;
using static TorchSharp.torch;

namespace VlmTune.Training;

/// <summary>
/// The image embeddings of training batches, from the vision tower or the vision feature cache, with the counts the
/// log reports (tiles through the tower, samples served from the cache).
/// </summary>
public sealed class ImageFeatureSupply(InternVLChatModel model, VisionFeatureCache? cache, Device device, ScalarType dtype, bool visionTrainable, bool projectorTrainable)
{
    /// <summary>Image tiles this process ran through the vision tower (cached ones skip it).</summary>
    public long TowerTiles { get; private set; }
    /// <summary>Samples with images this process trained on, and those of them whose features came from the vision cache.</summary>
    public long ImageSamples { get; private set; }
    public long ImageSamplesFromCache { get; private set; }

    /// <summary>
    /// The batch's image embeddings (tiles, 256, D) in prompt order. With the vision cache the ViT runs only on the
    /// tiles of samples whose features are not cached (and stores them for next time); the projector runs on all.
    /// </summary>
    /// <param name="towerTiles">Tiles the ViT ran on.</param>
    public Tensor? Embeddings(TrainBatch batch, out long towerTiles)
    {
        towerTiles = 0;
        ImageSamples += batch.Vision.Count;
        if (cache is null)
        {
            if (batch.Pixels is null) return null;
            towerTiles = batch.Pixels.shape[0];
            TowerTiles += towerTiles;
            return model.ExtractFeatures(batch.Pixels.to(device).to_type(dtype), visionGrad: visionTrainable, projectorGrad: projectorTrainable);
        }
        if (batch.Vision.Count == 0) return null;

        // Loader workers encode batches ahead, so a sample may have been encoded before an earlier batch stored its
        // features: take them now rather than run the ViT again (it runs once per distinct image list).
        var late = new Tensor?[batch.Vision.Count];
        var towerRows = new List<long>();
        long pixelRow = 0;
        for (int i = 0; i < batch.Vision.Count; i++)
        {
            var source = batch.Vision[i];
            if (source.Cached) continue;
            late[i] = source.StoreAs is { } entry ? cache.TryLoadStored(entry) : null;
            if (late[i] is null) for (int t = 0; t < source.Tiles; t++) towerRows.Add(pixelRow + t);
            pixelRow += source.Tiles;
        }
        Tensor? computed = null;
        if (towerRows.Count > 0)
        {
            var pixels = towerRows.Count == pixelRow ? batch.Pixels! : batch.Pixels!.index_select(0, tensor(towerRows.ToArray()));
            computed = model.VisionFeatures(pixels.to(device).to_type(dtype), grad: false);   // (tiles, 256, 4C)
            towerTiles = towerRows.Count;
            TowerTiles += towerTiles;
        }
        var cached = batch.CachedFeatures?.to(device);
        var parts = new List<Tensor>();
        long fromCache = 0, fromTower = 0;
        for (int i = 0; i < batch.Vision.Count; i++)
        {
            var source = batch.Vision[i];
            if (source.Cached)
            {
                parts.Add(cached!.narrow(0, fromCache, source.Tiles));
                fromCache += source.Tiles;
                ImageSamplesFromCache++;
            }
            else if (late[i] is { } stored)
            {
                parts.Add(stored.to(device));
                ImageSamplesFromCache++;
            }
            else
            {
                var part = computed!.narrow(0, fromTower, source.Tiles);
                fromTower += source.Tiles;
                if (source.StoreAs is { } entry) cache.Store(entry, part);
                parts.Add(part);
            }
        }
        return model.Project(parts.Count == 1 ? parts[0] : cat(parts, 0), grad: projectorTrainable);
    }
}
