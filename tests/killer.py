"""A callback that SIGKILLs its own run.py process in the middle of a training, once: for the tests that kill real runs."""

import os
import signal
from pathlib import Path

import lightning as L


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
