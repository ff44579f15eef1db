"""Sharded, resumable sample generation: sample i has seed (base_seed, i), whatever the batch size, the number of
ranks or a resume (seeds.py); the samples are written in the shard format (shards.py), and rerunning the same call
makes only the missing shards.
"""

from pathlib import Path

import numpy as np
import torch

from dg_lightning.distributed import barrier, rank_and_world_size
from dg_lightning.files import write_atomic
from dg_lightning.progress import bar
from dg_lightning.seeds import SampleNoise, sample_seed
from dg_lightning.shards import (DTYPES, FORMAT, claim, is_finished, num_shards, remove_stale_temps, shard_indices,
                                 shard_name, stores_nfe, to_uint8)


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



def claim_shards(out_dir, manifest, rank, world_size):
    """Claim out_dir for `manifest` (rank 0 writes it, the others check it once it is there), remove this rank's stale
    temporary files, and return (the folder's manifest (shards.claim), this rank's shard indices, those of them not
    finished yet)."""
    if rank == 0:  # rank 0 writes the manifest; the others check it once it is there
        manifest = claim(out_dir, manifest)
    barrier()
    if rank != 0:
        manifest = claim(out_dir, manifest)
    mine = range(rank, num_shards(manifest), world_size)
    remove_stale_temps(out_dir, {shard_name(k) for k in mine})
    return manifest, mine, [k for k in mine if not is_finished(out_dir / shard_name(k), manifest, k)]



def counts_nfe(sample_fn):
    """Whether sample_fn counts the score model's evaluations: an `nfe` list it appends each batch's NFE to
    (sampling.SampleFn, images.Decoded)."""
    return isinstance(getattr(sample_fn, "nfe", None), list)



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
    checked and kept; a damaged one is made again. A sample_fn that counts NFE (counts_nfe) gets each sample's NFE
    (its batch's) stored with it, unless the folder was written storing none (shards.claim).
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
        "nfe": counts_nfe(sample_fn),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest, mine, todo = claim_shards(out_dir, manifest, rank, world_size)
    with bar(progress) as progress_bar:
        total = sum(len(shard_indices(manifest, k)) for k in mine)
        done = total - sum(len(shard_indices(manifest, k)) for k in todo)
        task = progress_bar.add_task(f"generate {out_dir.name} [rank {rank}/{world_size}]", total=total, completed=done)
        for k in todo:
            arrays = _make_shard(sample_fn, manifest, out_shape, k, batch_size, device,
                                 lambda n: progress_bar.advance(task, n))
            write_atomic(out_dir / shard_name(k), lambda f: np.savez(f, **arrays))
    barrier()



def _make_shard(sample_fn, manifest, out_shape, k, batch_size, device, advance):
    """Run sample_fn over shard k in batches; returns the shard's arrays (with each sample's NFE, the last entry of
    sample_fn.nfe after its batch, when the manifest stores NFE) and calls advance(n) after each batch."""
    indices = shard_indices(manifest, k)
    classes = manifest["num_classes"]
    samples = np.empty((len(indices), *manifest["sample_shape"]), manifest["dtype"])
    labels = np.empty(len(indices), np.int64) if classes else None
    nfe = np.empty(len(indices), np.int64) if stores_nfe(manifest) else None
    batches = sample_batches(sample_fn, indices, manifest["shape"], manifest["base_seed"], classes, batch_size, device, out_shape)
    for batch, x, class_labels in batches:
        rows = slice(batch.start - indices.start, batch.stop - indices.start)
        if manifest["dtype"] == "uint8":
            x = to_uint8(x).permute(0, 2, 3, 1)
        samples[rows] = x.cpu().numpy()
        if classes:
            labels[rows] = class_labels.cpu().numpy()
        if nfe is not None:
            nfe[rows] = sample_fn.nfe[-1]
        advance(len(batch))
    arrays = {"samples": samples, "indices": np.arange(indices.start, indices.stop, dtype=np.int64)}
    extras = {"labels": labels, "nfe": nfe}
    return {**arrays, **{name: array for name, array in extras.items() if array is not None}}
