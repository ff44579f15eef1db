"""A callback that SIGKILLs its own run.py process in the middle of a training, once, and `python run.py` in a process
forked from a server that imported the project once: for the tests that kill real runs."""

import os
import runpy
import signal
import sys
from pathlib import Path

import lightning as L
import torch


class KillOnce(L.Callback):
    """SIGKILL this process before batch `batch` of epoch `epoch` of the training in a stage folder named `stage`-*,
    unless the file `marker` (relative to the working directory) exists; it is created just before the kill, so the
    rerun in the same folder trains on."""

    def __init__(self, stage, epoch=1, batch=1, marker="killed"):
        self.stage, self.epoch, self.batch, self.marker = stage, epoch, batch, Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        in_stage = Path(trainer.default_root_dir).name.startswith(f"{self.stage}-")
        if in_stage and (trainer.current_epoch, batch_idx) == (self.epoch, self.batch) and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


def run_py(cwd, argv, env, log):
    """The body of a forked `python run.py`: argv (run.py's path first) run as __main__ in folder cwd with the
    environment env and one torch thread, stdout and stderr into the file log."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(1)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")
