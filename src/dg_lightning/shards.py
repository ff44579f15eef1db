"""The shard format of generated samples: a folder of `manifest.json`, written before anything else, and shards
`shard-000000.npz`, ... Shard k holds samples [k * shard_size, (k + 1) * shard_size) (the last one may be shorter) with keys
- `samples`: uint8 NHWC images quantised as clip(x * 127.5 + 128, 0, 255) (EDM's and the DG authors'
  convention), or float32 arrays stored as returned (toy 2-D points, latents);
- `indices`: int64 sample indices;
- `labels`: int64 class labels, only when the run is conditional;
- `nfe`: int64 score-model evaluations spent on each sample (its batch's NFE), only when the manifest's `nfe` is true
  (the sampler counts them; manifests written before shards stored it have no such key: no NFE).
Each file is written atomically (files.write_atomic), so a killed run leaves only complete shards.
"""

import json
import logging
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from dg_lightning.files import write_atomic

log = logging.getLogger(__name__)


MANIFEST = "manifest.json"

FORMAT = "dg-lightning-shards-v1"

DTYPES = ("uint8", "float32")



class ShardError(ValueError):
    """A shard file that is not what the run's manifest promises."""



def to_uint8(x):
    """Quantise [-1, 1] floats to uint8 as clip(x * 127.5 + 128, 0, 255) (EDM's and the DG authors' convention); the layout is kept."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)



def shard_name(k):
    """The file name of shard k."""
    return f"shard-{k:06d}.npz"



def num_shards(manifest):
    """The number of shards of the run in `manifest`: ceil(num_samples / shard_size)."""
    return -(-manifest["num_samples"] // manifest["shard_size"])



def shard_indices(manifest, k):
    """The sample indices (a range) of shard k of the run in `manifest`."""
    size = manifest["shard_size"]
    return range(k * size, min((k + 1) * size, manifest["num_samples"]))



def read_manifest(path):
    """The manifest dict at `path`, with a clear error when it is absent or not valid JSON."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no manifest; {path.parent} was not written by dg_lightning.generate.generate "
            f"(or its run died before starting). Generate into an empty folder."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete {path.parent} and generate again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} manifest; delete {path.parent} and generate again")
    return manifest



def stores_nfe(manifest):
    """Whether the run's shards hold each sample's NFE (`nfe`); a manifest without the key (written before shards
    stored it) means none."""
    return manifest.get("nfe", False)



def claim(out_dir, manifest):
    """Write the manifest if the folder has none, check that the folder's manifest is this run's and return it. Only
    `nfe` may differ, one way: a run that counts NFE resumes a folder that stores none (written before shards stored
    it) and then stores none either."""
    path = out_dir / MANIFEST
    if not path.exists():
        write_atomic(path, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    found = read_manifest(path)
    diffs = [
        f"{key}: folder has {found.get(key)!r}, this run has {value!r}"
        for key, value in manifest.items()
        if key != "nfe" and found.get(key) != value
    ]
    if stores_nfe(found) and not stores_nfe(manifest):
        diffs.append("nfe: the folder's shards store each sample's NFE, this run's sample_fn does not count it")
    if diffs:
        raise ValueError(
            f"{path}: {out_dir} holds another run's samples ({'; '.join(diffs)}). "
            f"Generate into another folder, or delete {out_dir} to start over."
        )
    return found



def remove_stale_temps(out_dir, names):
    """Delete temp files that a killed run left for the shards in `names` (this rank's shards)."""
    for path in out_dir.glob(".shard-*.tmp"):
        if path.name.split(".")[1] + ".npz" in names:
            path.unlink(missing_ok=True)



def is_finished(path, manifest, k):
    """Whether shard k exists and is valid (check_shard_headers: the samples themselves are not read); a damaged shard
    is logged and counts as not finished."""
    if not path.exists():
        return False
    try:
        check_shard_headers(path, manifest, k)
    except ShardError as e:
        log.warning("%s; making it again", e)
        return False
    return True



def load_shards(folder, expect_shape=None, expect_labels=None):
    """All samples of a finished run in index order: (samples (N, *sample_shape), int64 labels (N,) or None).

    `expect_shape` is the stored per-sample shape ((H, W, C) for images); `expect_labels` True/False
    requires a conditional/unconditional run. Every shard is checked against the manifest.
    """
    folder = Path(folder)
    manifest = finished_manifest(folder, expect_shape, expect_labels)
    count = num_shards(manifest)
    samples = np.empty((manifest["num_samples"], *manifest["sample_shape"]), manifest["dtype"])
    labels = np.empty(manifest["num_samples"], np.int64) if manifest["num_classes"] else None
    for k in range(count):
        try:
            arrays = read_shard(folder / shard_name(k), manifest, k)
        except ShardError as e:  # e.g. flipped bytes under intact headers, which is_finished does not read: remove it
            (folder / shard_name(k)).unlink(missing_ok=True)
            raise ShardError(f"{e}. The shard was removed: rerun the generation with the same settings to make it "
                             "again (the other shards are kept)") from e
        rows = slice(k * manifest["shard_size"], k * manifest["shard_size"] + len(arrays["indices"]))
        samples[rows] = arrays["samples"]
        if labels is not None:
            labels[rows] = arrays["labels"]
    return samples, labels



def load_nfe(folder):
    """The int64 NFE of every sample of a finished run in index order (N,), or None when its shards store none (the
    manifest's `nfe`); every shard is checked as check_shard_headers checks it, without reading the samples."""
    folder = Path(folder)
    manifest = finished_manifest(folder)
    if not stores_nfe(manifest):
        return None
    return np.concatenate([shard_headers(folder / shard_name(k), manifest, k)[1]["nfe"]
                           for k in range(num_shards(manifest))])



def finished_manifest(folder, expect_shape=None, expect_labels=None):
    """The manifest of the finished run in `folder`, after checking (before reading any sample) that the folder exists
    and is not empty, that its manifest is valid and, when given, has this per-sample shape / labels or none, and that
    every shard file is there. FileNotFoundError or ValueError naming the folder and how to fix it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; generate the samples first (dg_lightning.generate.generate)")
    if not any(folder.iterdir()):
        raise FileNotFoundError(f"{folder}: the folder is empty; generate the samples first (dg_lightning.generate.generate)")
    manifest = read_manifest(folder / MANIFEST)
    if expect_shape is not None and tuple(expect_shape) != tuple(manifest["sample_shape"]):
        raise ValueError(
            f"{folder / MANIFEST}: the samples have per-sample shape {tuple(manifest['sample_shape'])}, "
            f"expected {tuple(expect_shape)}; point to a run made for this data"
        )
    if expect_labels is not None and expect_labels != (manifest["num_classes"] is not None):
        found = f"conditional ({manifest['num_classes']} classes)" if manifest["num_classes"] else "unconditional (no labels)"
        raise ValueError(f"{folder / MANIFEST}: the run is {found}, expected {'labels' if expect_labels else 'no labels'}")
    count = num_shards(manifest)
    missing = [shard_name(k) for k in range(count) if not (folder / shard_name(k)).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"{folder}: {len(missing)} of {count} shards are missing ({shown}): the generation did not finish. "
            f"Rerun it with the same settings to resume; finished shards are kept."
        )
    return manifest



def read_shard(path, manifest, k):
    """The arrays of shard k, checked against the manifest; ShardError naming the file, the problem and the expected form."""
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise shard_error(path, manifest, k, f"unreadable, truncated or corrupt ({type(e).__name__}: {e})") from e
    check_shard(path, manifest, k, arrays)
    return arrays



def shard_error(path, manifest, k, problem):
    """ShardError for shard k at `path`: the file, the problem and the form the manifest promises."""
    indices, classes = shard_indices(manifest, k), manifest["num_classes"]
    n = len(indices)
    return ShardError(
        f"{path}: {problem}; expected an .npz with 'samples' {manifest['dtype']} {(n, *manifest['sample_shape'])}, "
        f"'indices' int64 {indices.start}..{indices.stop - 1}" + (f", 'labels' int64 ({n},) in [0, {classes})" if classes else "")
        + (f", 'nfe' int64 ({n},) >= 1" if stores_nfe(manifest) else "")
    )



def check_shard(path, manifest, k, arrays, samples_form=None):
    """ShardError unless shard k's arrays match the manifest: the names, the samples' dtype and shape, indices = the
    shard's rows, labels in range. samples_form = (dtype, shape) stands in for arrays["samples"] when only the
    samples' .npy header was read (sources.shard_source); nfe >= 1 when the manifest says the shards store it."""
    indices, classes = shard_indices(manifest, k), manifest["num_classes"]
    n = len(indices)
    names = set(arrays) | ({"samples"} if samples_form is not None else set())
    expected = {"samples", "indices"} | ({"labels"} if classes else set()) | ({"nfe"} if stores_nfe(manifest) else set())
    if names != expected:
        raise shard_error(path, manifest, k, f"has keys {sorted(names)}")
    dtype, shape = samples_form or (arrays["samples"].dtype, arrays["samples"].shape)
    if dtype != manifest["dtype"] or tuple(shape) != (n, *manifest["sample_shape"]):
        raise shard_error(path, manifest, k, f"'samples' is {dtype} {tuple(shape)}")
    idx = arrays["indices"]
    if idx.dtype != np.int64 or not np.array_equal(idx, np.arange(indices.start, indices.stop)):
        raise shard_error(path, manifest, k, f"'indices' is {idx.dtype} {idx.shape} and not the shard's range")
    if classes:
        labels = arrays["labels"]
        if labels.dtype != np.int64 or labels.shape != (n,) or labels.min() < 0 or labels.max() >= classes:
            raise shard_error(path, manifest, k, f"'labels' is {labels.dtype} {labels.shape} with values out of range "
                              "or of the wrong form")
    if stores_nfe(manifest):
        nfe = arrays["nfe"]
        if nfe.dtype != np.int64 or nfe.shape != (n,) or nfe.min() < 1:
            raise shard_error(path, manifest, k, f"'nfe' is {nfe.dtype} {nfe.shape} with values below 1 or of the "
                              "wrong form")



def stored_npy(path, f, info):
    """(offset, dtype, shape) of the .npy member `info` (its ZipInfo) stored uncompressed in the zip (.npz) open as the
    binary file f at `path`: its C-order array data are the bytes [offset, offset + dtype.itemsize * prod(shape)) of
    the file. The data start after the member's local header, whose name and extra field lengths are read there
    (np.savez's zip64 extra field is not in the central directory). ShardError naming the file when the member is
    compressed, Fortran-ordered or its headers disagree; read errors propagate (check_shard_headers names them)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ShardError(f"{path}: {info.filename} is compressed (np.savez_compressed), so its rows cannot be read "
                         "in place; expected np.savez's uncompressed members, as generate.py writes them")
    f.seek(info.header_offset)
    signature, name_length, extra_length = struct.unpack("<4s22xHH", f.read(30))
    start = info.header_offset + 30 + name_length + extra_length
    f.seek(start)
    version = np.lib.format.read_magic(f)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    shape, fortran_order, dtype = read_header[version](f)
    offset = f.tell()
    if signature != b"PK\x03\x04" or offset - start + dtype.itemsize * np.prod(shape, dtype=np.int64) != info.file_size:
        raise ShardError(f"{path}: {info.filename}'s local zip header or .npy header does not match its "
                         f"{info.file_size} bytes; the file is corrupt")
    if fortran_order or dtype.hasobject:
        raise ShardError(f"{path}: {info.filename} holds {'Python objects' if dtype.hasobject else 'Fortran-order data'}; "
                         "expected a C-order array of numbers, as np.savez writes")
    return offset, dtype, shape



def npz_arrays(archive, skip):
    """The arrays of the .npz open as the zipfile.ZipFile `archive`, but member `skip`, keyed as np.load keys them
    (member name without .npy); pickled objects are refused."""
    arrays = {}
    for name in archive.namelist():
        if name != skip:
            with archive.open(name) as data:
                arrays[name.removesuffix(".npy")] = np.lib.format.read_array(data, allow_pickle=False)
    return arrays



def check_shard_headers(path, manifest, k):
    """(byte offset of the samples' rows, int64 labels or None) of shard k, checked as shard_headers checks it."""
    offset, small = shard_headers(path, manifest, k)
    return offset, small.get("labels")



def shard_headers(path, manifest, k):
    """(byte offset of the samples' rows, the shard's other arrays by name) of shard k, checked against the manifest as
    read_shard checks it but without reading the samples: only their .npy header (stored_npy) and the small members,
    through one parse of the zip. Reading every sample instead would cost minutes at each start of every rank (78 GB
    of ImageNet crops); write_atomic's renames leave only whole shards, so a damaged shard is a cut or replaced file,
    which this check catches."""
    member = "samples.npy"
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            offset, dtype, shape = stored_npy(path, f, archive.getinfo(member))
            small = npz_arrays(archive, skip=member)
    except ShardError:
        raise
    except (OSError, ValueError, EOFError, KeyError, struct.error, zipfile.BadZipFile) as e:
        raise shard_error(path, manifest, k, f"unreadable, truncated or corrupt ({type(e).__name__}: {e})") from e
    check_shard(path, manifest, k, small, samples_form=(dtype, shape))
    return offset, small
