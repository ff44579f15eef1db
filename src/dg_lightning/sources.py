"""Real images in the formats users have, read into a data.ArraySource (uint8 NHWC, optional int64 labels).

- the DG authors' `true_data.npz` (array `arr_0`, uint8 (N, H, W, C)) and `true_data_label.npz` (`samples`
  uint8 (N, H, W, C) and `label` integer (N,));
- an image folder: PNG / JPEG files, either all directly in the folder (no labels) or all in class subfolders
  (labels 0, 1, ... in sorted subfolder order, as torchvision's ImageFolder);
- EDM's dataset zip (written by its dataset_tool.py): PNG / JPEG files plus an optional `dataset.json` holding
  {"labels": [[file name, label], ...]} or {"labels": null};
- a folder of dg_lightning shards (shards.py: `manifest.json` and `shard-*.npz`).
With data.crop, each image is centre-cropped to crop x crop and resized to the experiment's resolution as it is read
(Soft Truncation's CelebA preprocessing), so a folder of full-size photos never sits in memory at full size.
Every reader checks the whole file before returning and raises SourceError naming the file and the expected form.
shard_source reads a shard folder's rows straight from its shards, never all in memory (ImageNet's real latents
and images); it checks every shard's headers and small members, not the bytes of every sample.
"""

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dg_lightning.data import ArraySource, ShardRows
from dg_lightning.shards import (
    MANIFEST,
    ShardError,
    check_shard_headers,
    finished_manifest,
    load_shards,
    num_shards,
    shard_indices,
    shard_name,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NPZ_FORMS = "arrays 'arr_0' (true_data.npz) or 'samples' and 'label' (true_data_label.npz)"


class SourceError(ValueError):
    """Real data that cannot be used: missing, empty, or not of the expected form."""


def _checked(images, labels, where, resolution=None, channels=None):
    """(images, labels) after checking uint8 (N, H, W, C) images, C in {1, 3}, and one integer label per image."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        found = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise SourceError(f"{where}: images must be uint8 (N, H, W, C) with C = 1 or 3 (NHWC, 0..255), got {found}")
    if len(images) == 0:
        raise SourceError(f"{where}: holds no images")
    if resolution is not None and images.shape[1:3] != (resolution, resolution):
        raise SourceError(f"{where}: images are {images.shape[1]}x{images.shape[2]}, the experiment needs "
                          f"{resolution}x{resolution}; use the data set made at this resolution")
    if channels is not None and images.shape[3] != channels:
        raise SourceError(f"{where}: images have {images.shape[3]} channels, the experiment needs {channels}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise SourceError(f"{where}: labels must be integers >= 0 of shape ({len(images)},) (one per image), "
                              f"got {labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
    return images, labels


def read_npz(path):
    """(images, labels or None) of the authors' true_data.npz (`arr_0`) or true_data_label.npz (`samples`, `label`)."""
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SourceError(f"{path}: cannot read it as an .npz ({type(exc).__name__}: {exc}); expected {NPZ_FORMS}") from exc
    if "arr_0" in arrays:
        return arrays["arr_0"], None
    if {"samples", "label"} <= set(arrays):
        return arrays["samples"], arrays["label"]
    raise SourceError(f"{path}: has arrays {sorted(arrays)}; expected {NPZ_FORMS}")


def _decode(data, name):
    """uint8 (H, W, C) pixels of one encoded image: greyscale stays 1 channel, anything else becomes RGB."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image if image.mode in ("L", "RGB") else image.convert("RGB")
            return np.asarray(image).reshape(image.height, image.width, -1)
    except OSError as exc:
        raise SourceError(f"{name}: not a readable image ({exc})") from exc


def center_crop_resize(pixels, crop, resolution):
    """uint8 (resolution, resolution, C) pixels of the central crop x crop square of uint8 (H, W, C) pixels, resized
    by antialiased bilinear interpolation on [0, 1] values and rounded (Soft Truncation's CelebA preprocessing:
    datasets.py central_crop(img, 140), then resize_small to 64 with tf.image.resize(antialias=True))."""
    height, width = pixels.shape[:2]
    if min(height, width) < crop:
        raise SourceError(f"an image is {height}x{width}, smaller than data.crop={crop}; use a smaller crop or the "
                          "full-size images")
    top, left = (height - crop) // 2, (width - crop) // 2
    square = torch.from_numpy(np.ascontiguousarray(pixels[top:top + crop, left:left + crop])).permute(2, 0, 1)
    resized = F.interpolate(square[None].double() / 255, size=(resolution, resolution), mode="bilinear",
                            antialias=True, align_corners=False)[0]
    return (resized * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _prepared(pixels, prepare, name):
    """pixels through `prepare` (None: as they are), naming the image in a SourceError."""
    if prepare is None:
        return pixels
    try:
        return prepare(pixels)
    except SourceError as exc:
        raise SourceError(f"{name}: {exc}") from exc


def _stack(pixels, names, where):
    """Stack decoded images of one size and channel count, naming the first image that differs from the first."""
    for image, name in zip(pixels, names):
        if image.shape != pixels[0].shape:
            raise SourceError(f"{where}: {name} is {image.shape} (H, W, C) but {names[0]} is {pixels[0].shape}; "
                              "all images must share one size and channel count")
    return np.stack(pixels)


def image_folder(path):
    """(files, int64 labels, class names) of an ImageNet-style folder <class>/<image>: labels 0, 1, ... in sorted
    class-folder order (torchvision's ImageFolder, DiT's and DG_imagenet's convention)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder; expected an ImageNet-style folder <class>/<image>")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        images = sorted(p for p in (path / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise FileNotFoundError(f"{path / name}: class folder with no {'/'.join(IMAGE_SUFFIXES)} files; every "
                                    "class folder needs images (or remove it: labels follow the sorted folder names)")
        files += images
        labels += [label] * len(images)
    if not files:
        raise FileNotFoundError(f"{path}: no class subfolders with images; expected <class>/<image> "
                                f"({'/'.join(IMAGE_SUFFIXES)} files, one subfolder per class)")
    return files, np.array(labels, np.int64), classes


def read_image_folder(path, max_size=None, prepare=None):
    """(images, labels or None) of the first max_size PNG / JPEG files directly in `path` (no labels) or in class
    subfolders (labels in sorted class-folder order, image_folder), each decoded image passed through `prepare`."""
    path = Path(path)
    flat = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    nested = any(f.suffix.lower() in IMAGE_SUFFIXES for d in path.iterdir() if d.is_dir() for f in d.rglob("*"))
    if not (flat or nested):
        raise SourceError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} files; expected images in the folder or in class "
                          "subfolders (one per class)")
    if flat and nested:
        raise SourceError(f"{path}: images lie at several depths; put them all directly in the folder (unlabelled) "
                          "or all in class subfolders <class>/<image> (labelled)")
    try:
        files, labels = (flat, None) if flat else image_folder(path)[:2]
    except FileNotFoundError as exc:
        raise SourceError(str(exc)) from exc
    files, labels = files[:max_size], None if labels is None else labels[:max_size]
    images = _stack([_prepared(_decode(f.read_bytes(), f), prepare, f) for f in files],
                    [str(f.relative_to(path)) for f in files], path)
    return images, labels


def read_edm_zip(path, max_size=None, prepare=None):
    """(images, labels or None) of the first max_size images of an EDM dataset zip in sorted name order, each decoded
    image passed through `prepare`; labels from dataset.json."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SourceError(f"{path}: cannot read it as a zip ({exc}); expected EDM's dataset zip (dataset_tool.py)") from exc
    with archive:
        names = sorted(n for n in archive.namelist() if Path(n).suffix.lower() in IMAGE_SUFFIXES)
        if not names:
            raise SourceError(f"{path}: the zip holds no {'/'.join(IMAGE_SUFFIXES)} files; expected EDM's dataset zip")
        kept = names[:max_size]
        images = _stack([_prepared(_decode(archive.read(n), f"{path}:{n}"), prepare, f"{path}:{n}") for n in kept],
                        kept, path)
        if "dataset.json" not in archive.namelist():
            return images, None
        try:
            labels = json.loads(archive.read("dataset.json"))["labels"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"{path}: dataset.json must be {{\"labels\": [[file name, label], ...]}} or "
                              f"{{\"labels\": null}} ({type(exc).__name__}: {exc})") from exc
    if labels is None:
        return images, None
    by_name = dict(labels) if all(isinstance(e, list) and len(e) == 2 for e in labels) else None
    missing = [n for n in names if by_name is None or n not in by_name]
    if by_name is None or len(by_name) != len(names) or missing:
        raise SourceError(f"{path}: dataset.json must hold one [file name, label] pair per image ({len(names)} images, "
                          f"{len(labels)} entries; first image without a label: {missing[0] if missing else None})")
    return images, np.array([by_name[n] for n in kept])


def load_source(path, name=None, resolution=None, channels=None, labels=None, max_size=None, crop=None):
    """ArraySource of the real images at `path`, read by its form: .npz, .zip, a shard folder or an image folder.

    resolution / channels: the image size and channel count the experiment needs (None: any). labels: None keeps
    what the file has, True requires labels, False drops them. max_size: keep at most the first max_size images.
    crop: centre-crop each image to crop x crop and resize it to `resolution` as it is read (center_crop_resize).
    """
    if crop is not None and resolution is None:
        raise ValueError("load_source: crop needs the resolution to resize the crops to")
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path} does not exist; expected real images as an .npz ({NPZ_FORMS}), EDM's dataset zip, "
                          "or a folder of PNG / JPEG images")
    prepare = None if crop is None else lambda pixels: center_crop_resize(pixels, crop, resolution)
    if path.is_dir() and not (path / MANIFEST).is_file():
        images, found = read_image_folder(path, max_size, prepare)
    elif path.suffix.lower() == ".zip":
        images, found = read_edm_zip(path, max_size, prepare)
    elif path.is_dir() or path.suffix.lower() == ".npz":
        images, found = (load_shards if path.is_dir() else read_npz)(path)
        if prepare is not None:  # the arrays' own form first, then each kept image cropped and resized
            images, found = _checked(images, found, path)
            images = np.stack([_prepared(image, prepare, f"{path}[{i}]") for i, image in enumerate(images[:max_size])])
            found = None if found is None else found[:max_size]
    else:
        raise SourceError(f"{path}: unknown suffix {path.suffix!r}; expected an .npz ({NPZ_FORMS}), EDM's dataset "
                          ".zip, or a folder of images")
    images, found = _checked(images, found, path, resolution, channels)
    if labels and found is None:
        raise SourceError(f"{path}: has no class labels, but the experiment is conditional; use a labelled file "
                          "(true_data_label.npz, class subfolders, or a zip whose dataset.json has labels)")
    found = None if labels is False or found is None else found[:max_size]
    return ArraySource(images[:max_size], found, name=name or str(path))


def shard_source(folder, name=None):
    """ArraySource of a finished shard folder (shards.py format) whose samples stay in the shards: the folder, its
    manifest and every shard file are checked first (shards.finished_manifest, as load_shards checks them), then every
    shard's headers against the manifest (shards.check_shard_headers); batches read their rows straight from the shards'
    uncompressed samples.npy members (data.ShardRows), labels are held in memory. Gives the same samples and labels
    in the same order as load_shards, and writes nothing."""
    folder = Path(folder)
    manifest = finished_manifest(folder)
    files = [folder / shard_name(k) for k in range(num_shards(manifest))]
    try:
        checked = [check_shard_headers(path, manifest, k) for k, path in enumerate(files)]
    except ShardError as e:
        raise ShardError(f"{e}. Rerun the stage that wrote {folder} with the same settings to make it again.") from e
    offsets, labels = zip(*checked)
    lengths = [len(shard_indices(manifest, k)) for k in range(len(files))]
    samples = ShardRows(files, offsets, lengths, manifest["dtype"], manifest["sample_shape"])
    labels = np.concatenate(labels) if manifest["num_classes"] else None  # as check_shard: 0 classes is unlabelled
    return ArraySource(samples, labels, name=name or str(folder))
