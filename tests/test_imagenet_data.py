"""ImageNet-scale real data: shard folders read memory-mapped (sources.shard_source, data.NpyRows) give the data module
exactly the batches of the in-memory arrays, and the encode stage stores ADM-G++'s pixel-space crops as uint8."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dg_lightning.data import ArraySource, NpyRows, RealFakeDataModule
from dg_lightning.generate import SampleNoise, generate, load_shards, sample_seed
from dg_lightning.latents import center_crop, encode_image_folder, image_folder
from dg_lightning.sources import NPY_LABELS, NPY_SAMPLES, SourceError, shard_source


def write_shards(folder, num_samples, images=False, num_classes=5):
    """A finished shard folder (shard size 10, the last one short): float32 (4, 2, 2) arrays or uint8 8x8 images."""
    shape = (3, 8, 8) if images else (4, 2, 2)
    generate(lambda latents, labels, noise: latents.clamp(-1, 1) if images else latents, folder, num_samples, shape,
             batch_size=7, shard_size=10, num_classes=num_classes, dtype="uint8" if images else "float32",
             progress=False)
    return folder


def batches(datamodule, epochs=2):
    """Every batch the data module's loader yields over `epochs` epochs (as Lightning sets the sampler's epoch)."""
    loader, out = datamodule.train_dataloader(), []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out += list(loader)
    return out


@pytest.mark.parametrize("images", [False, True], ids=["latents", "uint8 images"])
def test_memory_mapped_shards_give_the_data_module_exactly_the_in_memory_batches(tmp_path, images):
    real_dir, fake_dir = write_shards(tmp_path / "real", 37, images), write_shards(tmp_path / "fake", 23, images)
    in_memory = [ArraySource(*load_shards(folder)) for folder in (real_dir, fake_dir)]
    mapped = [shard_source(folder) for folder in (real_dir, fake_dir)]
    assert isinstance(mapped[0].samples, NpyRows) and mapped[0].is_image == in_memory[0].is_image == images
    assert np.array_equal(mapped[0].samples[np.arange(37)], in_memory[0].samples)
    assert torch.equal(mapped[0].labels, in_memory[0].labels)

    expected = batches(RealFakeDataModule(*in_memory, batch_size=8, seed=3, conditional=True))
    found = batches(RealFakeDataModule(*mapped, batch_size=8, seed=3, conditional=True))
    assert len(found) == len(expected) == 2 * (37 // 4)
    for a, b in zip(found, expected):
        assert a.keys() == b.keys() == {"x0", "is_real", "class_labels"}
        assert all(torch.equal(a[key], b[key]) for key in a)
    torch.manual_seed(0)
    diffused = RealFakeDataModule(*mapped, batch_size=8, conditional=True).diffuse(dict(found[0]))
    torch.manual_seed(0)
    reference = RealFakeDataModule(*in_memory, batch_size=8, conditional=True).diffuse(dict(expected[0]))
    assert torch.equal(diffused["x_t"], reference["x_t"]) and torch.equal(diffused["t"], reference["t"])


def test_rows_pickle_as_the_path_and_the_npy_files_are_written_once(tmp_path):
    folder = write_shards(tmp_path / "latents", 37)
    source = shard_source(folder)
    data = pickle.dumps(source.samples)
    assert len(data) < 1000  # the path, not the 37 x 64 bytes of samples (nor 21 GB of ImageNet latents)
    assert np.array_equal(pickle.loads(data)[[36, 0, 5]], source.samples[[36, 0, 5]])

    written = os.stat(folder / NPY_SAMPLES).st_mtime_ns
    shard_source(folder)
    assert os.stat(folder / NPY_SAMPLES).st_mtime_ns == written  # reused
    (folder / NPY_LABELS).unlink()  # a pair left incomplete is written again
    assert torch.equal(shard_source(folder).labels, source.labels)
    np.save(folder / NPY_SAMPLES, np.zeros((36, 4, 2, 2), np.float32))
    with pytest.raises(SourceError, match=r"samples.npy holds float32 \(36, 4, 2, 2\) but the shards .* hold float32 "
                                          r"\(37, 4, 2, 2\); delete it"):
        shard_source(folder)
    (folder / "shard-000001.npz").unlink()
    (folder / NPY_SAMPLES).unlink()
    with pytest.raises(ValueError, match=r"shard-000001.npz: unreadable.*Rerun the stage"):
        shard_source(folder)


def test_without_an_autoencoder_the_encode_stage_stores_the_uint8_crops(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("b", "a")):
        (tmp_path / "train" / name).mkdir(parents=True)
        for j in range(3):
            pixels = rng.integers(0, 256, (20 + 7 * j, 16 + 9 * c, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / name / f"{j}.png")
    encode_image_folder(None, tmp_path / "train", tmp_path / "crops", image_size=16, base_seed=4, batch_size=4,
                        shard_size=4, progress=False)
    crops, labels = load_shards(tmp_path / "crops")
    assert crops.dtype == np.uint8 and crops.shape == (6, 16, 16, 3) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    files, _, _ = image_folder(tmp_path / "train")
    flips = []
    for i, path in enumerate(files):
        flips.append(bool(SampleNoise([sample_seed(4, i)]).randint(2)))  # the same coin as the latent encoding
        expected = center_crop(Image.open(path), 16)
        assert np.array_equal(crops[i], expected[:, ::-1] if flips[-1] else expected)
    assert 0 < sum(flips) < len(flips)
