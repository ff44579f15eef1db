"""Resumption: a killed discriminator training resumes from last.ckpt to the weights of an uninterrupted run, and a
re-launched sweep point that finished is skipped."""

import lightning as L
import numpy as np
import pytest
import torch

from dg_lightning.data import ArraySource
from dg_lightning.stages import build_network, stage_dir, train_discriminator

EPOCHS, KILL_AT = 4, 2
TRAIN = ["logger=csv", f"trainer.max_epochs={EPOCHS}", "trainer.max_steps=-1", "data.batch_size=32",
         "discriminator.net.width=32", "discriminator.net.depth=2", "discriminator.net.time_dim=16", "callbacks={}"]


class Killed(Exception):
    pass


class KillAtEpoch(L.Callback):
    """Stops the process's training at the start of epoch `epoch` (after the checkpoint of the epoch before)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise Killed(f"killed at epoch {self.epoch}")


def sources():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(96, 2)).astype(np.float32)
    fake = (rng.normal(size=(96, 2)) * 1.5 + 0.5).astype(np.float32)
    return ArraySource(real, name="real"), ArraySource(fake, name="fake")


def train(cfg, callbacks=()):
    return train_discriminator(cfg, *sources(), build_network(cfg, cfg.discriminator.net), [], ["seed", "trainer"],
                               callbacks=callbacks)


def test_killed_training_resumes_from_last_checkpoint_to_the_uninterrupted_weights(compose_cfg, tmp_path):
    uninterrupted = train(compose_cfg(*TRAIN, f"paths.cache_dir={tmp_path}/a")).state_dict()

    cfg = compose_cfg(*TRAIN, f"paths.cache_dir={tmp_path}/b")
    with pytest.raises(Killed):
        train(cfg, [KillAtEpoch(KILL_AT)])
    checkpoints = stage_dir(cfg, "train", ["seed", "trainer"]) / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["epoch000.ckpt", "epoch001.ckpt", "last.ckpt"]
    assert not (checkpoints.parent / "discriminator.pt").exists()
    killed = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert killed["epoch"] == KILL_AT - 1

    resumed = train(cfg).state_dict()
    assert sorted(p.name for p in checkpoints.glob("epoch*.ckpt")) == [f"epoch{e:03d}.ckpt" for e in range(EPOCHS)]
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
    # The resumed run trained on: its weights moved away from the ones it was killed with.
    assert any(not torch.equal(value, killed["state_dict"][f"discriminator.{name}"]) for name, value in resumed.items())
