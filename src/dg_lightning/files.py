"""Atomic files: a reader never sees a partial file, and a killed or failed write leaves the old one."""

import errno
import os
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


def atomic_save(obj, path: Path, save=torch.save):
    """save(obj, binary file object) through write_atomic: a killed run never leaves a partial file.

    Under torch.distributed every rank calls it with the same object: rank 0 writes, the others wait at a barrier.
    """
    if rank_and_world_size()[0] == 0:
        write_atomic(path, lambda f: save(obj, f))
    barrier()
