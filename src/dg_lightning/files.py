"""Atomic files (a reader never sees a partial file, and a killed or failed write leaves the old one), the one way a
weights file is read (load_weights: never code from a pickle) and the content ids of the files a stage reads (what its
fingerprint holds of them)."""

import errno
import hashlib
import json
import os
import pickle
import re
import secrets
from pathlib import Path

import torch

from dg_lightning.distributed import barrier, rank_and_world_size


def write_atomic(path, write):
    """Write the file at `path` with write(binary file object) through a temp file in the same folder, fsync and rename.

    No reader ever sees a partial file, and a failed write leaves neither a temp file nor a changed `path`; a full disk
    (ENOSPC) is an OSError naming the file and saying to free space. The temp file is `.{stem}.{pid}.{random}.tmp`;
    the file gets the permissions of any new file (0o666 & ~umask).
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
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the device writing {path} (the file there, if any, is "
                          "unchanged): free space on that disk, e.g. python -m dg_lightning.cache prune --older-than 7d, "
                          "and run again") from e
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class UnsafeWeightsError(pickle.UnpicklingError):
    """A weights file whose pickle would call code (a global outside torch's weights-only set): refused, unrun."""


def load_weights(file):
    """The tensors (in plain containers) that torch.save wrote to `file` (a path or a binary file object), onto the CPU
    with weights_only=True; a pickle that would call code raises UnsafeWeightsError naming the file, its payload unrun.
    Every weights file the project reads comes through here."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?i)unsupported (?:global:? )?GLOBAL ([\w.]+)", str(exc))
        raise UnsafeWeightsError(
            f"{file}: refused unread, its pickle would call {found.group(1) if found else 'code'}; weights files are "
            "read as plain tensors only. Use a file of tensors (torch.save of a state dict) from a source you trust"
        ) from exc


def atomic_save(obj, path: Path, save=torch.save):
    """save(obj, binary file object) through write_atomic: a killed run never leaves a partial file.

    Under torch.distributed every rank calls it with the same object: rank 0 writes, the others wait at a barrier.
    """
    if rank_and_world_size()[0] == 0:
        write_atomic(path, lambda f: save(obj, f))
    barrier()


def content_hash(path):
    """The sha256 hex digest of a file's bytes, streamed in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files_under(folder):
    """(relative path, size, mtime_ns) of every file under folder, from one stat per file."""
    for entry in os.scandir(folder):
        if entry.is_dir():
            yield from ((f"{entry.name}/{name}", size, mtime) for name, size, mtime in _files_under(entry.path))
        elif entry.is_file():
            stat = entry.stat()
            yield entry.name, stat.st_size, stat.st_mtime_ns


def listing_hash(folder):
    """The sha256 hex digest of a folder's listing: the sorted (relative path, size, mtime_ns) of every file under it
    (the files' bytes are not read, so an image folder of a million files costs one walk)."""
    return hashlib.sha256(json.dumps(sorted(_files_under(folder))).encode()).hexdigest()


def content_id(path, cache_file):
    """What a fingerprint holds of the file or folder at `path`: None when there is none, "listing:<hash>" of a folder,
    "sha256:<hash>" of a file's bytes, read from the JSON cache_file when the file's (path, size, mtime_ns) are those
    it was hashed at, else hashed and stored there (atomically)."""
    path = Path(path).absolute() if path is not None else None
    if path is None or not path.exists():
        return None
    if path.is_dir():
        return f"listing:{listing_hash(path)}"
    cache_file = Path(cache_file)
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    stat = path.stat()
    known = cache.get(str(path), {})
    if known.get("size") != stat.st_size or known.get("mtime_ns") != stat.st_mtime_ns:
        known = cache[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": content_hash(path)}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_file, lambda f: f.write((json.dumps(cache, indent=1, sort_keys=True) + "\n").encode()))
    return f"sha256:{known['sha256']}"
