"""Real-data readers (dg_lightning.sources): every format users have, written here in tmp_path, read back exactly;
bad files refused with the file and the expected form named."""

import io
import json
import re
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from dg_lightning import sources
from dg_lightning.generate import generate
from dg_lightning.shards import MANIFEST, load_shards, shard_name
from dg_lightning.sources import SourceError, load_source, shard_source


def random_images(n, size=8, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def png_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_edm_zip(path, images, labels=None, names=None):
    """EDM's dataset zip: PNGs under 00000/ and dataset.json {"labels": [[name, label], ...] or null}."""
    names = names or [f"00000/img{i:08d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w") as archive:
        for name, image in zip(names, images):
            archive.writestr(name, png_bytes(image))
        entries = None if labels is None else [[n, int(y)] for n, y in zip(names, labels)]
        archive.writestr("dataset.json", json.dumps({"labels": entries}))
    return path


def test_true_data_npz_reads_arr_0_without_labels(tmp_path):
    images = random_images(5)
    np.savez(tmp_path / "true_data.npz", images)  # positional: stored as arr_0, like the authors' file
    source = load_source(tmp_path / "true_data.npz", resolution=8, channels=3)
    assert np.array_equal(source.samples, images) and source.labels is None
    x0, _ = source.fetch([0])
    assert torch.equal(x0[0], torch.from_numpy(images[0]).permute(2, 0, 1).float() / 127.5 - 1)


def test_true_data_label_npz_reads_samples_and_labels(tmp_path):
    images, labels = random_images(6), np.array([3, 0, 9, 9, 1, 2], np.uint8)
    np.savez(tmp_path / "true_data_label.npz", samples=images, label=labels)
    source = load_source(tmp_path / "true_data_label.npz", labels=True, max_size=4)
    assert np.array_equal(source.samples, images[:4])
    assert source.labels.dtype == torch.int64 and source.labels.tolist() == [3, 0, 9, 9]
    assert load_source(tmp_path / "true_data_label.npz", labels=False).labels is None


@pytest.mark.parametrize("arrays, match", [
    ({"images": random_images(2)}, r"has arrays \['images'\]; expected arrays 'arr_0' \(true_data.npz\) or 'samples'"),
    ({"arr_0": random_images(2).astype(np.float32)}, r"images must be uint8 \(N, H, W, C\).*got float32 \(2, 8, 8, 3\)"),
    ({"arr_0": random_images(2)[..., :2]}, r"C = 1 or 3.*got uint8 \(2, 8, 8, 2\)"),
    ({"arr_0": random_images(0)}, "holds no images"),
    ({"samples": random_images(3), "label": np.arange(2)}, r"labels must be integers >= 0 of shape \(3,\).*\(2,\)"),
    ({"samples": random_images(2), "label": np.array([0.0, 1.0])}, r"labels must be integers.*float64"),
])
def test_npz_of_the_wrong_form_names_the_file_and_the_expected_form(tmp_path, arrays, match):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    with pytest.raises(SourceError, match=match) as info:
        load_source(path)
    assert str(path) in str(info.value)


def test_wrong_resolution_channels_or_missing_labels_are_refused(tmp_path):
    path = tmp_path / "true_data.npz"
    np.savez(path, random_images(2, size=8, channels=3))
    with pytest.raises(SourceError, match=r"images are 8x8, the experiment needs 32x32"):
        load_source(path, resolution=32)
    with pytest.raises(SourceError, match=r"3 channels, the experiment needs 1"):
        load_source(path, channels=1)
    with pytest.raises(SourceError, match=r"has no class labels, but the experiment is conditional.*true_data_label"):
        load_source(path, labels=True)


@pytest.mark.parametrize("name, match", [
    ("absent.npz", r"absent.npz does not exist; expected real images as an .npz"),
    ("data.h5", r"unknown suffix '.h5'"),
    ("broken.npz", r"cannot read it as an .npz"),
    ("broken.zip", r"cannot read it as a zip"),
])
def test_missing_unknown_or_unreadable_files_are_refused(tmp_path, name, match):
    path = tmp_path / name
    if name != "absent.npz":
        path.write_bytes(b"not what the suffix says")
    with pytest.raises(SourceError, match=match):
        load_source(path)


def test_flat_image_folder_has_no_labels_and_keeps_pixels(tmp_path):
    images = random_images(3, channels=3)
    for i, image in enumerate(images):
        (tmp_path / f"{i:03d}.png").write_bytes(png_bytes(image))
    source = load_source(tmp_path)
    assert np.array_equal(source.samples, images) and source.labels is None


def test_class_subfolders_give_labels_in_sorted_folder_order(tmp_path):
    images = random_images(4, channels=1)
    for image, (folder, name) in zip(images, [("cat", "a.png"), ("airplane", "b.png"), ("cat", "c.png"), ("dog", "d.png")]):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_bytes(png_bytes(image))
    source = load_source(tmp_path, channels=1)
    # files in path order: airplane/b, cat/a, cat/c, dog/d; classes airplane=0, cat=1, dog=2
    assert np.array_equal(source.samples, images[[1, 0, 2, 3]])
    assert source.labels.tolist() == [0, 1, 1, 2]


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(SourceError, match="no .png/.jpg/.jpeg files"):
        load_source(tmp_path)
    (tmp_path / "a.png").write_bytes(png_bytes(random_images(1)[0]))
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "b.png").write_bytes(png_bytes(random_images(1)[0]))
    with pytest.raises(SourceError, match="images lie at several depths"):
        load_source(tmp_path)
    (tmp_path / "dogs" / "b.png").unlink()
    (tmp_path / "b.png").write_bytes(png_bytes(random_images(1, size=4)[0]))
    with pytest.raises(SourceError, match=r"b.png is \(4, 4, 3\) \(H, W, C\) but a.png is \(8, 8, 3\)"):
        load_source(tmp_path)
    (tmp_path / "b.png").write_bytes(b"garbage")
    with pytest.raises(SourceError, match=r"b.png: not a readable image"):
        load_source(tmp_path)


def test_edm_zip_matches_labels_by_file_name(tmp_path):
    images, labels = random_images(4), [5, 1, 7, 0]
    names = ["00000/img00000003.png", "00000/img00000001.png", "00000/img00000000.png", "00000/img00000002.png"]
    path = write_edm_zip(tmp_path / "cifar10-8x8.zip", images, labels, names)
    source = load_source(path, resolution=8, labels=True)
    order = np.argsort(names)  # EDM reads the images in sorted name order
    assert np.array_equal(source.samples, images[order])
    assert source.labels.tolist() == [labels[i] for i in order]


def test_edm_zip_with_null_labels_is_unlabelled(tmp_path):
    images = random_images(2)
    source = load_source(write_edm_zip(tmp_path / "ffhq.zip", images))
    assert np.array_equal(source.samples, images) and source.labels is None


def test_edm_zip_with_an_unlabelled_image_is_refused(tmp_path):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i, image in enumerate(random_images(2)):
            archive.writestr(f"img{i}.png", png_bytes(image))
        archive.writestr("dataset.json", json.dumps({"labels": [["img0.png", 1]]}))
    with pytest.raises(SourceError, match=r"one \[file name, label\] pair per image \(2 images, 1 entries; first image "
                                          r"without a label: img1.png\)"):
        load_source(path)


def test_shard_folder_reads_the_generated_samples_and_labels(tmp_path):
    def sample_fn(latents, labels, noise):
        return latents.clamp(-1, 1)

    generate(sample_fn, tmp_path / "fakes", 5, (3, 4, 4), num_classes=10, batch_size=2, shard_size=3, progress=False)
    source = load_source(tmp_path / "fakes", labels=True)
    assert source.samples.shape == (5, 4, 4, 3) and source.samples.dtype == np.uint8
    assert source.labels.shape == (5,) and 0 <= source.labels.min() and source.labels.max() < 10


def _unfinished_folder(tmp_path, case):
    """(folder, what its error must say) for a missing folder, one without a manifest, or a run with a deleted shard."""
    if case == "missing folder":
        return tmp_path / "nowhere", re.escape(f"{tmp_path / 'nowhere'}: no such folder; generate the samples first")
    if case == "no manifest":
        (tmp_path / "foreign").mkdir()
        (tmp_path / "foreign" / "samples.npz").write_bytes(b"x")
        return tmp_path / "foreign", re.escape(f"{tmp_path / 'foreign' / MANIFEST}: no manifest") + ".*Generate into"
    generate(lambda latents, labels, noise: latents.clamp(-1, 1), tmp_path / "run", 5, (3, 4, 4), shard_size=2,
             progress=False)
    (tmp_path / "run" / shard_name(1)).unlink()
    return tmp_path / "run", (re.escape(f"{tmp_path / 'run'}: 1 of 3 shards are missing (shard-000001.npz)")
                              + ".*Rerun it with the same settings")


@pytest.mark.parametrize("case", ["missing folder", "no manifest", "deleted shard"])
def test_shard_source_names_an_unfinished_folder_as_load_shards_does_before_reading_a_shard(tmp_path, monkeypatch, case):
    def no_shard_read(*args):
        raise AssertionError("a shard was read before the folder was checked")

    monkeypatch.setattr(sources, "check_shard_headers", no_shard_read)
    folder, match = _unfinished_folder(tmp_path, case)
    with pytest.raises(FileNotFoundError, match=match) as from_source:
        shard_source(folder)
    with pytest.raises(FileNotFoundError) as from_load:
        load_shards(folder)
    assert str(from_source.value) == str(from_load.value)


def ramp_photo(height=218, width=178, channels=3, slope=1.0):
    """A CelebA-sized (218 x 178) photo whose value is slope * column, in every row and channel."""
    columns = np.round(slope * np.arange(width)).astype(np.uint8)
    return np.broadcast_to(columns[None, :, None], (height, width, channels)).copy()


def test_center_crop_resize_is_soft_truncations_central_crop_then_an_antialiased_resize():
    # The 140 x 140 crop of a 218 x 178 photo starts at row 39, column 19; an antialiased bilinear resize is a
    # normalised symmetric filter, so on a linear ramp it returns the ramp at each output pixel's centre (away from the
    # borders, where the filter is cut): column j of 64 sits at 19 + (j + 0.5) * 140 / 64 - 0.5 in the photo.
    photo = ramp_photo()
    resized = sources.center_crop_resize(photo, 140, 64)
    assert resized.shape == (64, 64, 3) and resized.dtype == np.uint8
    j = np.arange(3, 61)
    expected = 19 + (j + 0.5) * 140 / 64 - 0.5
    assert np.abs(resized[:, j, :].astype(float) - expected[None, :, None]).max() <= 0.5 + 1e-9  # uint8 rounding
    assert (resized == resized[:1]).all()  # constant down the columns: the crop is in rows 39..178
    constant = np.full((218, 178, 3), 77, np.uint8)
    assert (sources.center_crop_resize(constant, 140, 64) == 77).all()


def test_crop_is_applied_as_the_images_are_read_in_every_form(tmp_path):
    photos = np.stack([ramp_photo(slope=s) for s in (1.0, 0.5, 1.4)])
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    for i, photo in enumerate(photos):
        Image.fromarray(photo).save(folder / f"{i + 1:06d}.png")
    expected = np.stack([sources.center_crop_resize(p, 140, 64) for p in photos[:2]])
    np.savez(tmp_path / "photos.npz", photos)
    for path in (folder, write_edm_zip(tmp_path / "celeba.zip", photos), tmp_path / "photos.npz"):
        source = load_source(path, resolution=64, channels=3, max_size=2, crop=140)
        assert np.array_equal(source.samples, expected), path
    with pytest.raises(SourceError, match=r"000001.png: an image is 218x178, smaller than data.crop=200"):
        load_source(folder, resolution=64, crop=200)
    with pytest.raises(SourceError, match="images are 218x178, the experiment needs 64x64"):
        load_source(folder, resolution=64)  # without data.crop, full-size photos are refused
