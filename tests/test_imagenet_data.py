"""ImageNet-scale real data: shard folders read in place (sources.shard_source, data.ShardRows) give the data module
exactly the batches of the in-memory arrays, and the encode stage stores ADM-G++'s pixel-space crops as uint8."""

import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dg_lightning.data import ArraySource, RealFakeDataModule, ShardRows
from dg_lightning.generate import generate
from dg_lightning.seeds import SampleNoise, sample_seed
from dg_lightning.shards import MANIFEST, load_shards
from dg_lightning.latents import center_crop, shard_image_folder
from dg_lightning.sources import SourceError, image_folder, shard_source


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
def test_shard_rows_give_the_data_module_exactly_the_in_memory_batches(tmp_path, images):
    real_dir, fake_dir = write_shards(tmp_path / "real", 37, images), write_shards(tmp_path / "fake", 23, images)
    in_memory = [ArraySource(*load_shards(folder)) for folder in (real_dir, fake_dir)]
    on_disk = [shard_source(folder) for folder in (real_dir, fake_dir)]
    assert isinstance(on_disk[0].samples, ShardRows) and on_disk[0].is_image == in_memory[0].is_image == images
    assert np.array_equal(on_disk[0].samples[np.arange(37)], in_memory[0].samples)
    assert torch.equal(on_disk[0].labels, in_memory[0].labels)
    assert sorted(p.name for p in real_dir.iterdir()) == [MANIFEST] + [f"shard-00000{k}.npz" for k in range(4)]

    expected = batches(RealFakeDataModule(*in_memory, batch_size=8, seed=3, conditional=True))
    found = batches(RealFakeDataModule(*on_disk, batch_size=8, seed=3, conditional=True))
    assert len(found) == len(expected) == 2 * (37 // 4)
    for a, b in zip(found, expected):
        assert a.keys() == b.keys() == {"x0", "is_real", "class_labels"}
        assert all(torch.equal(a[key], b[key]) for key in a)
    torch.manual_seed(0)
    diffused = RealFakeDataModule(*on_disk, batch_size=8, conditional=True).diffuse(dict(found[0]))
    torch.manual_seed(0)
    reference = RealFakeDataModule(*in_memory, batch_size=8, conditional=True).diffuse(dict(expected[0]))
    assert torch.equal(diffused["x_t"], reference["x_t"]) and torch.equal(diffused["t"], reference["t"])


def test_shard_rows_index_like_the_in_memory_array_and_pickle_as_paths(tmp_path):
    folder = write_shards(tmp_path / "images", 37, images=True)  # shards of 10 rows, the last one of 7
    samples, labels = load_shards(folder)
    source = shard_source(folder)
    rows = source.samples
    assert rows.shape == samples.shape and rows.dtype == samples.dtype and len(rows) == 37
    random = np.random.default_rng(0).integers(-37, 37, (5, 64))  # duplicates, negatives, every shard
    indices = [0, 9, 10, 36, -1, -37, slice(None), slice(5, 33), slice(36, 2, -3), slice(8, 12), slice(30, 30),
               [36, 0, 5, 5, 35], np.array([], np.int64), random[0], random, torch.arange(36, 20, -2)]
    for index in indices:
        expected = samples[np.asarray(index) if isinstance(index, torch.Tensor) else index]
        found = rows[index]
        assert found.shape == expected.shape and np.array_equal(found, expected), index
    assert torch.equal(source.labels, torch.from_numpy(labels))
    for bad in (37, -38, [0, 37], np.array([0.5])):
        with pytest.raises(IndexError):
            rows[bad]

    data = pickle.dumps(rows)
    assert len(data) < 2000  # the paths and offsets, not the 37 x 192 bytes of samples (nor 78 GB of ImageNet crops)
    assert np.array_equal(pickle.loads(data)[random[1]], samples[random[1]])


def rewrite(path, save=np.savez, **changes):
    """Write shard `path` again with `save`, some arrays changed."""
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files}
    save(path, **{**arrays, **changes})


DAMAGES = {
    "compressed": (lambda p: rewrite(p, np.savez_compressed), r"samples.npy is compressed \(np.savez_compressed\)"),
    "fortran": (lambda p: rewrite(p, samples=np.asfortranarray(np.load(p)["samples"])),
                "samples.npy holds Fortran-order data"),
    "truncated": (lambda p: os.truncate(p, os.path.getsize(p) // 2), "unreadable, truncated or corrupt"),
    "dtype": (lambda p: rewrite(p, samples=np.load(p)["samples"].astype(np.float32)),
              r"'samples' is float32 \(10, 8, 8, 3\); expected an .npz with 'samples' uint8 \(10, 8, 8, 3\)"),
    "indices": (lambda p: rewrite(p, indices=np.arange(10, dtype=np.int64)), r"'indices' is int64 \(10,\) and not the shard's range; .*'indices' int64 10..19"),
    "labels": (lambda p: rewrite(p, labels=np.full(10, 5, np.int64)),
               r"'labels' is int64 \(10,\) with values out of range.* in \[0, 5\)"),
    "keys": (lambda p: rewrite(p, extra=np.zeros(1)), r"has keys \['extra', 'indices', 'labels', 'samples'\]"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_shard_is_named_before_any_row_is_read(tmp_path, damage):
    folder = write_shards(tmp_path / "images", 37, images=True)
    make, problem = DAMAGES[damage]
    make(folder / "shard-000001.npz")
    with pytest.raises(ValueError, match=rf"shard-000001.npz: {problem}.*Rerun the stage that wrote .*images"):
        shard_source(folder)


def test_a_shard_truncated_after_the_check_fails_the_read_clearly(tmp_path):
    folder = write_shards(tmp_path / "images", 37, images=True)
    samples, rows = load_shards(folder)[0], shard_source(folder).samples
    os.truncate(folder / "shard-000003.npz", os.path.getsize(folder / "shard-000003.npz") // 2)
    assert np.array_equal(rows[[0, 12]], samples[[0, 12]])  # the other shards stay readable
    with pytest.raises(OSError, match=r"shard-000003.npz ends before row 6: it was truncated"):
        rows[[0, 36]]


def test_without_an_autoencoder_the_encode_stage_stores_the_uint8_crops(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("b", "a")):
        (tmp_path / "train" / name).mkdir(parents=True)
        for j in range(3):
            pixels = rng.integers(0, 256, (20 + 7 * j, 16 + 9 * c, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / name / f"{j}.png")
    shard_image_folder(None, tmp_path / "train", tmp_path / "crops", image_size=16, base_seed=4, batch_size=4,
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


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_truncated_jpeg_in_the_image_folder_is_named_when_encoded(tmp_path, num_workers):
    rng = np.random.default_rng(0)
    (tmp_path / "train" / "n01").mkdir(parents=True)
    for j in range(3):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "train" / "n01" / f"{j}.JPEG")
    broken = tmp_path / "train" / "n01" / "1.JPEG"
    os.truncate(broken, os.path.getsize(broken) // 2)
    with pytest.raises(SourceError, match=rf"{re.escape(str(broken))}: not a readable image \(.*[Tt]runcated.*\); "
                                          r"replace it with an intact copy, or remove it"):
        shard_image_folder(None, tmp_path / "train", tmp_path / "crops", image_size=16, batch_size=4,
                           num_workers=num_workers, progress=False)
