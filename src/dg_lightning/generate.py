"""Sharded, resumable sample generation: sample i has seed (base_seed, i) (DESIGN.md, Principles).

A run folder holds `manifest.json`, written before anything else, and shards `shard-000000.npz`, ...
Shard k holds samples [k * shard_size, (k + 1) * shard_size) (the last one may be shorter) with keys
- `samples`: uint8 NHWC images quantised as clip(x * 127.5 + 128, 0, 255) (EDM's and the DG authors'
  convention), or float32 arrays stored as returned (toy 2-D points, latents);
- `indices`: int64 sample indices;
- `labels`: int64 class labels, only when the run is conditional.
Each file is written to a temp file in the same folder, fsynced, then renamed, so a killed run leaves
only complete shards; rerunning the same call makes the missing ones, whatever the batch size or the
number of ranks.
"""

import json
import logging
import os
import secrets
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "dg-lightning-shards-v1"
DTYPES = ("uint8", "float32")


class ShardError(ValueError):
    """A shard file that is not what the run's manifest promises."""


def sample_seed(base_seed, index):
    """The 64-bit seed of sample `index` in run `base_seed`: a hash of the pair, so runs with different base seeds share no sample."""
    if base_seed < 0 or index < 0:
        raise ValueError(f"sample_seed needs base_seed >= 0 and index >= 0, got ({base_seed}, {index})")
    return int(np.random.SeedSequence((base_seed, index)).generate_state(1, np.uint64)[0])


SEED_STREAMS = {"fakes": 1, "real": 2}  # stream k draws at base seed k * 2**32 + seed; configured seeds are stream 0


def stream_base_seed(seed, stream):
    """The base seed of a named stream of a run with `seed`: k * 2**32 + seed for SEED_STREAMS[stream] = k, above
    [0, 2**32) where every configured seed lies (config.validate). The evaluation and callback samples draw at their
    configured seeds; the discriminator's training fakes ("fakes") and the real data's encoding ("real": subset,
    flips, posterior noise) draw above them, so no evaluated sample starts from the latents and noise of a fake (with
    one base seed for both, the unguided evaluation samples were the first fakes) or of a real image's encoding."""
    return SEED_STREAMS[stream] * 2**32 + seed


class SampleNoise:
    """Per-sample random streams (like EDM's StackedRandomGenerator): row b of every draw comes from sample b's own CPU generator.

    A sample's draws therefore depend only on its seed and on the order of the draws, not on the batch it
    is in; generators live on the CPU so the numbers are the same on any device.
    """

    def __init__(self, seeds, device="cpu"):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.device = torch.device(device)

    def randn(self, size, dtype=torch.float32, device=None):
        """N(0, I) noise of `size`, where size[0] is the number of samples."""
        return self._stack(lambda g: torch.randn(size[1:], generator=g, dtype=dtype), size, device)

    def randn_like(self, x):
        """N(0, I) noise with the shape, dtype and device of x."""
        return self.randn(x.shape, dtype=x.dtype, device=x.device)

    def randint(self, high, size=()):
        """int64 integers uniform in [0, high) of shape (number of samples, *size)."""
        return self._stack(lambda g: torch.randint(high, size, generator=g), (len(self.generators), *size), None)

    def _stack(self, draw, size, device):
        """Stack one draw per generator into a batch of `size` on `device` (default: the source's device)."""
        if len(size) == 0 or size[0] != len(self.generators):
            raise ValueError(
                f"SampleNoise holds {len(self.generators)} samples but was asked for size {tuple(size)}; "
                f"the first dimension must be the number of samples"
            )
        return torch.stack([draw(g) for g in self.generators]).to(device or self.device)


def rank_and_world_size(rank=None, world_size=None):
    """(rank, number of ranks) of this process in torch.distributed's default group, (0, 1) without one; a rank or
    world_size given replaces the group's."""
    in_group = dist.is_available() and dist.is_initialized()
    group_rank, group_size = (dist.get_rank(), dist.get_world_size()) if in_group else (0, 1)
    return group_rank if rank is None else rank, group_size if world_size is None else world_size


def barrier():
    """Wait until every rank of torch.distributed's default group gets here (nothing without a group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def to_uint8(x):
    """Quantise [-1, 1] floats to uint8 as clip(x * 127.5 + 128, 0, 255) (EDM's and the DG authors' convention); the layout is kept."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def sample_batches(sample_fn, indices, shape, base_seed=0, num_classes=None, batch_size=64, device="cpu", out_shape=None):
    """Yield (batch indices, detached float samples, int64 labels or None) over `indices` in batches of batch_size.

    Per batch: latents N(0, I) of (B, *shape), then the labels (uniform in [0, num_classes), when given),
    come from the samples' own generators (SampleNoise), and sample_fn(latents, labels or None, noise)
    must return finite floats of (B, *out_shape) (out_shape defaults to shape; a None entry accepts any
    size). Sample i therefore depends only on (base_seed, i), not on the batch or the other indices.
    """
    out_shape = tuple(shape if out_shape is None else out_shape)
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        noise = SampleNoise([sample_seed(base_seed, i) for i in batch], device)
        latents = noise.randn((len(batch), *shape))
        labels = noise.randint(num_classes) if num_classes else None
        x = sample_fn(latents, labels, noise)
        expected = (len(batch), *out_shape)
        if (not torch.is_tensor(x) or not x.is_floating_point() or x.ndim != len(expected)
                or any(e is not None and s != e for s, e in zip(x.shape, expected))):
            found = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            shown = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
            raise ValueError(f"sample_fn returned {found} for samples {_describe(batch)}; expected floats {shown}")
        if not torch.isfinite(x).all():
            raise ValueError(f"sample_fn returned NaN or inf for samples {_describe(batch)}")
        yield batch, x.detach(), labels


def _describe(indices):
    """'a..b' for a run of consecutive indices, else the list of them (for error messages)."""
    if isinstance(indices, range) and indices.step == 1:
        return f"{indices.start}..{indices.stop - 1}"
    return str(list(indices))


def shard_name(k):
    """The file name of shard k."""
    return f"shard-{k:06d}.npz"


def claim_shards(out_dir, manifest, rank, world_size):
    """Claim out_dir for `manifest` (rank 0 writes it, the others check it once it is there), remove this rank's stale
    temporary files, and return (this rank's shard indices, those of them not finished yet)."""
    if rank == 0:  # rank 0 writes the manifest; the others check it once it is there
        claim(out_dir, manifest)
    barrier()
    if rank != 0:
        claim(out_dir, manifest)
    mine = range(rank, num_shards(manifest), world_size)
    remove_stale_temps(out_dir, {shard_name(k) for k in mine})
    return mine, [k for k in mine if not is_finished(out_dir / shard_name(k), manifest, k)]


def generate(
    sample_fn,
    out_dir,
    num_samples,
    shape,
    *,
    base_seed=0,
    batch_size=64,
    shard_size=1000,
    num_classes=None,
    out_shape=None,
    dtype="uint8",
    fingerprint=None,
    device="cpu",
    rank=None,
    world_size=None,
    progress=True,
):
    """Write this rank's missing shards (k % world_size == rank) of the run in `out_dir`, then wait for the other ranks.

    rank and world_size default to this process's place in torch.distributed's group ((0, 1) without one); every
    rank of the group must call generate, and returns once all shards are written (a barrier), so any rank may then
    load_shards. No two ranks write the same shard.

    For each batch of indices, latents N(0, I) of (B, *shape) are drawn from the samples' own generators,
    then the labels (uniform in [0, num_classes), when given), and
    `sample_fn(latents, labels or None, noise)` returns (B, *out_shape) floats (out_shape defaults to
    shape), in [-1, 1] NCHW for dtype "uint8". The sampler takes any later noise from `noise`
    (a SampleNoise) so that sample i is the same for any batch size, rank count or resume. Gradients
    stay enabled (guidance needs them). `fingerprint` (e.g. a hash of the config) goes into the
    manifest: a folder made by different settings raises instead of mixing runs. Finished shards are
    checked and kept; a damaged one is made again.
    """
    out_dir = Path(out_dir)
    out_shape = tuple(int(s) for s in (shape if out_shape is None else out_shape))
    rank, world_size = rank_and_world_size(rank, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"generate needs 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if min(num_samples, batch_size, shard_size) < 1:
        raise ValueError(
            f"generate needs num_samples, batch_size and shard_size >= 1, "
            f"got {num_samples}, {batch_size}, {shard_size}"
        )
    if base_seed < 0:
        raise ValueError(f"generate: base_seed must be >= 0, got {base_seed}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"generate: num_classes must be None (unconditional) or >= 1, got {num_classes}")
    if dtype not in DTYPES:
        raise ValueError(f"generate: dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "uint8" and len(out_shape) != 3:
        raise ValueError(f"generate: dtype 'uint8' stores images, so out_shape must be (C, H, W), got {out_shape}")
    sample_shape = (*out_shape[1:], out_shape[0]) if dtype == "uint8" else out_shape
    manifest = {
        "format": FORMAT,
        "num_samples": num_samples,
        "shape": [int(s) for s in shape],
        "sample_shape": list(sample_shape),
        "shard_size": shard_size,
        "base_seed": base_seed,
        "num_classes": num_classes,
        "dtype": dtype,
        "fingerprint": fingerprint,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    mine, todo = claim_shards(out_dir, manifest, rank, world_size)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        total = sum(len(shard_indices(manifest, k)) for k in mine)
        done = total - sum(len(shard_indices(manifest, k)) for k in todo)
        task = bar.add_task(f"generate {out_dir.name} [rank {rank}/{world_size}]", total=total, completed=done)
        for k in todo:
            arrays = _make_shard(sample_fn, manifest, out_shape, k, batch_size, device, lambda n: bar.advance(task, n))
            write_atomic(out_dir / shard_name(k), lambda f: np.savez(f, **arrays))
    barrier()


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
        except ShardError as e:
            raise ShardError(f"{e}. Rerun the generation with the same settings to make this shard again.") from e
        rows = slice(k * manifest["shard_size"], k * manifest["shard_size"] + len(arrays["indices"]))
        samples[rows] = arrays["samples"]
        if labels is not None:
            labels[rows] = arrays["labels"]
    return samples, labels


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


def claim(out_dir, manifest):
    """Write the manifest if the folder has none, then check that the folder's manifest is this run's."""
    path = out_dir / MANIFEST
    if not path.exists():
        write_atomic(path, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    found = read_manifest(path)
    diffs = [
        f"{key}: folder has {found.get(key)!r}, this run has {value!r}"
        for key, value in manifest.items()
        if found.get(key) != value
    ]
    if diffs:
        raise ValueError(
            f"{path}: {out_dir} holds another run's samples ({'; '.join(diffs)}). "
            f"Generate into another folder, or delete {out_dir} to start over."
        )


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
    )


def check_shard(path, manifest, k, arrays, samples_form=None):
    """ShardError unless shard k's arrays match the manifest: the names, the samples' dtype and shape, indices = the
    shard's rows, labels in range. samples_form = (dtype, shape) stands in for arrays["samples"] when only the
    samples' .npy header was read (sources.shard_source)."""
    indices, classes = shard_indices(manifest, k), manifest["num_classes"]
    n = len(indices)
    names = set(arrays) | ({"samples"} if samples_form is not None else set())
    if names != {"samples", "indices"} | ({"labels"} if classes else set()):
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
    """(byte offset of the samples' rows, int64 labels or None) of shard k, checked against the manifest as read_shard
    checks it but without reading the samples: only their .npy header (stored_npy) and the small members, through one
    parse of the zip. Reading every sample instead would cost minutes at each start of every rank (78 GB of ImageNet
    crops); write_atomic's renames leave only whole shards, so a damaged shard is a cut or replaced file, which this
    check catches."""
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
    return offset, small.get("labels")


def _make_shard(sample_fn, manifest, out_shape, k, batch_size, device, advance):
    """Run sample_fn over shard k in batches; returns the shard's arrays and calls advance(n) after each batch."""
    indices = shard_indices(manifest, k)
    classes = manifest["num_classes"]
    samples = np.empty((len(indices), *manifest["sample_shape"]), manifest["dtype"])
    labels = np.empty(len(indices), np.int64) if classes else None
    batches = sample_batches(sample_fn, indices, manifest["shape"], manifest["base_seed"], classes, batch_size, device, out_shape)
    for batch, x, class_labels in batches:
        rows = slice(batch.start - indices.start, batch.stop - indices.start)
        if manifest["dtype"] == "uint8":
            x = to_uint8(x).permute(0, 2, 3, 1)
        samples[rows] = x.cpu().numpy()
        if classes:
            labels[rows] = class_labels.cpu().numpy()
        advance(len(batch))
    arrays = {"samples": samples, "indices": np.arange(indices.start, indices.stop, dtype=np.int64)}
    return arrays if labels is None else {**arrays, "labels": labels}


def write_atomic(path, write):
    """Write the file at `path` with write(binary file object) through a temp file in the same folder, fsync and rename.

    No reader ever sees a partial file, and a failed write leaves neither a temp file nor a changed `path`.
    The temp file is `.{stem}.{pid}.{random}.tmp`; the file gets the permissions of any new file (0o666 & ~umask).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    f = open(tmp, "xb")
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
