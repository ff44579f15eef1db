"""Read speed of a shard folder's rows: data.ShardRows (rows read in place from the shards, sources.shard_source) against
the former copy into one samples.npy read memory-mapped (np.load(mmap_mode="r"), what data.NpyRows did).

Writes a folder of uint8 images (the shard format of shards.py), then times random batches on both paths with the files in
the page cache (warm) and evicted from it before every batch (cold, posix_fadvise DONTNEED on this folder's files
only), plus shard_source's check of the folder (headers and small members), a full check reading every shard
(warm), and the copy that ShardRows replaces.
Run: python bench/shard_rows.py --shards 50 --shard-size 1000 --size 64 --batches 100 --batch 128
"""

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, parser, report

from dg_lightning.generate import generate
from dg_lightning.shards import MANIFEST, load_shards, read_manifest, read_shard
from dg_lightning.sources import shard_source


def evict(paths):
    """Drop these files' pages from the page cache, so the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def ms_per_batch(fetch, batches, files=None):
    """Mean milliseconds of fetch(indices) over the batches; files: evicted before every batch (not timed)."""
    total = 0.0
    for indices in batches:
        if files is not None:
            evict(files)
        start = time.perf_counter()
        fetch(indices)
        total += time.perf_counter() - start
    return 1e3 * total / len(batches)


def main():
    p = parser("ShardRows against a memory-mapped samples.npy copy: milliseconds per random batch.")
    p.add_argument("--shards", type=int, default=50)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--size", type=int, default=64, help="images are size x size x 3 uint8")
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--folder", default=None, help="where to write the shards (default: a temporary folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        folder, num = Path(tmp) / "shards", args.shards * args.shard_size
        start = time.perf_counter()
        generate(lambda latents, labels, noise: latents.clamp(-1, 1), folder, num, (3, args.size, args.size),
                 batch_size=500, shard_size=args.shard_size, num_classes=1000, dtype="uint8", progress=False)
        write_s = time.perf_counter() - start
        shards = sorted(folder.glob("shard-*.npz"))

        start = time.perf_counter()
        source = shard_source(folder)
        check_s = time.perf_counter() - start
        start = time.perf_counter()  # what a full check would cost: every shard read whole (shards.read_shard)
        manifest = read_manifest(folder / MANIFEST)
        for k, shard in enumerate(shards):
            read_shard(shard, manifest, k)
        full_check_s = time.perf_counter() - start

        copy = Path(tmp) / "samples.npy"  # the former copy: every shard read and appended once
        start = time.perf_counter()
        with open(copy, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                     "shape": (num, args.size, args.size, 3)})
            for shard in shards:
                with np.load(shard) as npz:
                    f.write(npz["samples"].data)
            f.flush()
            os.fsync(f.fileno())
        copy_s = time.perf_counter() - start

        rng = np.random.default_rng(args.seed)
        batches = [rng.permutation(num)[:args.batch] for _ in range(args.batches)]
        expected = load_shards(folder)[0][batches[0]]
        result = {"machine": machine("cpu"), "settings": {**vars(args), "row_bytes": source.samples.row_bytes},
                  "write_shards_s": write_s, "shard_source_check_s": check_s,
                  "full_check_s": full_check_s, "former_copy_s": copy_s}
        # Cold first: pages mapped into a process stay cached, so the cold memmap is mapped again for every batch
        # (and unmapped after it); then every file is read once into the page cache and mapped once for the warm runs.
        def mapped_once(indices):
            return np.array(np.load(copy, mmap_mode="r")[indices])

        for name, fetch, files in (("shard_rows", source.samples.__getitem__, shards), ("npy_memmap", mapped_once, [copy])):
            assert np.array_equal(fetch(batches[0]), expected)
            result[name] = {"cold_ms_per_batch": ms_per_batch(fetch, batches, files)}
        for path in [*shards, copy]:
            path.read_bytes()
        mapped = np.load(copy, mmap_mode="r")
        result["shard_rows"]["warm_ms_per_batch"] = ms_per_batch(source.samples.__getitem__, batches)
        result["npy_memmap"]["warm_ms_per_batch"] = ms_per_batch(lambda indices: np.array(mapped[indices]), batches)
        report(args, result)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
