"""Resumption: a killed discriminator training or pretraining (digits score model, noise-aware classifier) resumes
from last.ckpt to the weights of an uninterrupted run; a damaged last.ckpt falls back to an intact checkpoint or a fresh
start, and a full disk leaves the previous checkpoint whole."""

import errno
import logging
import shutil
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from dg_lightning import training
from dg_lightning.pipelines import digits
from dg_lightning.callbacks import RNGStates
from dg_lightning.data import ArraySource
from dg_lightning.pipelines.recipe import stage_dir
from dg_lightning.training import build_network, train_discriminator

EPOCHS, KILL_AT = 4, 2
TRAIN = ["logger=csv", "data.batch_size=32", "discriminator.net.width=32", "discriminator.net.depth=2",
         "discriminator.net.time_dim=16", "callbacks=none", "~callbacks.sampling", "data.num_held_out=8"]
PER_EPOCH = 96 // 16  # 96 pairs (and 8 held-out rows of each source), 16 pairs a batch of 32
# step-bounded training (the toy's setting) that ends one step before the end of the last epoch
LENGTHS = {"epochs": [f"trainer.max_epochs={EPOCHS}", "trainer.max_steps=-1"],
           "steps": ["trainer.max_epochs=-1", f"trainer.max_steps={PER_EPOCH * EPOCHS - 1}"]}
# the head guiding as the final Adam iterate at a constant learning rate, or as an EMA with a cosine-decayed rate
# (the EMA and the scheduler's step live in the checkpoint)
AVERAGING = {"final": ["discriminator.ema_decay=null", "discriminator.lr_schedule=constant"],
             "ema_cosine": ["discriminator.ema_decay=0.9", "discriminator.lr_schedule=cosine"]}


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
    real = rng.normal(size=(104, 2)).astype(np.float32)
    fake = (rng.normal(size=(104, 2)) * 1.5 + 0.5).astype(np.float32)
    return ArraySource(real, name="real"), ArraySource(fake, name="fake")


def train(cfg):
    return train_discriminator(cfg, *sources(), build_network(cfg, cfg.discriminator.net), [],
                               stage_dir(cfg, "train", ["seed", "trainer"]))


def killed(compose_cfg, tmp_path, name, *overrides):
    """(config without the kill, checkpoints folder) of a training killed at the start of epoch KILL_AT (KillAtEpoch,
    configured in callbacks.kill) in cache `name`."""
    settings = [*TRAIN, f"paths.cache_dir={tmp_path / name}", *overrides]
    with pytest.raises(Killed):
        train(compose_cfg(*settings, f"+callbacks.kill={{_target_: test_resume.KillAtEpoch, epoch: {KILL_AT}}}"))
    cfg = compose_cfg(*settings)
    return cfg, stage_dir(cfg, "train", ["seed", "trainer"]) / "checkpoints"


@pytest.mark.parametrize("averaging", AVERAGING)
@pytest.mark.parametrize("length", LENGTHS)
def test_killed_training_resumes_from_last_checkpoint_to_the_uninterrupted_weights(compose_cfg, tmp_path, length,
                                                                                 averaging):
    """Bounded by epochs or by steps (where Lightning's own fit loop would replay a batch of the finished epoch)."""
    settings = [*LENGTHS[length], *AVERAGING[averaging]]
    uninterrupted = train(compose_cfg(*TRAIN, *settings, f"paths.cache_dir={tmp_path}/a")).state_dict()

    cfg, checkpoints = killed(compose_cfg, tmp_path, "b", *settings)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch001.ckpt", "last.ckpt"]  # checkpoints.keep=1
    assert not (checkpoints.parent / "discriminator.pt").exists()
    at_kill = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert at_kill["epoch"] == KILL_AT - 1

    resumed = train(cfg).state_dict()
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"epoch{EPOCHS - 1:03d}.ckpt", "last.ckpt"]
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
    # The resumed run trained on: its weights moved away from the ones it was killed with.
    assert any(not torch.equal(value, at_kill["state_dict"][f"discriminator.{name}"]) for name, value in resumed.items())


def cut_in_half(path):
    """Truncate the file at path to half its length, as a full disk left it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_last_checkpoint_falls_back_to_the_previous_intact_one_with_a_warning(compose_cfg, tmp_path, caplog):
    uninterrupted = train(compose_cfg(*TRAIN, *LENGTHS["epochs"], f"paths.cache_dir={tmp_path}/a")).state_dict()
    cfg, checkpoints = killed(compose_cfg, tmp_path, "b", *LENGTHS["epochs"], "checkpoints.keep=-1")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch000.ckpt", "epoch001.ckpt", "last.ckpt"]
    for name in ("last.ckpt", "epoch001.ckpt"):
        cut_in_half(checkpoints / name)

    with caplog.at_level(logging.WARNING, logger="dg_lightning.training"):
        assert training.resume_checkpoint(checkpoints) == checkpoints / "epoch000.ckpt"
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "dg_lightning.training"]
    assert f"{checkpoints / 'last.ckpt'} (BadZipFile" in warning and f"{checkpoints / 'epoch001.ckpt'} (BadZipFile" in warning
    assert warning.endswith(f"resuming from {checkpoints / 'epoch000.ckpt'}")

    # Epoch 1 is trained again from epoch 0's checkpoint: the weights of the uninterrupted run.
    resumed = train(cfg).state_dict()
    assert all(torch.equal(resumed[name], value) for name, value in uninterrupted.items())
    assert training.damage(checkpoints / "last.ckpt") is None


def test_with_every_checkpoint_damaged_the_stage_starts_afresh_with_a_warning(compose_cfg, tmp_path, caplog):
    uninterrupted = train(compose_cfg(*TRAIN, *LENGTHS["epochs"], f"paths.cache_dir={tmp_path}/a")).state_dict()
    cfg, checkpoints = killed(compose_cfg, tmp_path, "b", *LENGTHS["epochs"])
    for path in checkpoints.iterdir():
        cut_in_half(path)
    with caplog.at_level(logging.WARNING, logger="dg_lightning.training"):
        resumed = train(cfg).state_dict()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "dg_lightning.training"]
    assert str(checkpoints / "last.ckpt") in warning and str(checkpoints / "epoch001.ckpt") in warning
    assert warning.endswith("no intact checkpoint is left, so the stage starts afresh "
                            "(delete the damaged files to silence this)")
    assert all(torch.equal(resumed[name], value) for name, value in uninterrupted.items())


def test_a_full_disk_while_saving_leaves_the_previous_last_checkpoint_whole_and_names_the_file(compose_cfg, tmp_path,
                                                                                             monkeypatch):
    cfg, checkpoints = killed(compose_cfg, tmp_path, "b", "checkpoints.keep=0")  # last.ckpt alone
    before = (checkpoints / "last.ckpt").read_bytes()

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 the first bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training.torch, "save", disk_full)
    with pytest.raises(OSError, match="no space left on the device writing .* free space") as error:
        train(cfg)
    assert error.value.errno == errno.ENOSPC and f"writing {checkpoints / 'last.ckpt'} " in str(error.value)
    monkeypatch.undo()
    assert (checkpoints / "last.ckpt").read_bytes() == before  # whole, and still epoch KILL_AT - 1's
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]  # no temp file left
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == KILL_AT - 1


# --- pretraining (training.pretrain) ---

class Steps(L.Callback):
    """Appends trainer.global_step to the file at `path` before each optimiser step; raises Killed instead at step
    kill_at (the steps before it are done)."""

    def __init__(self, path, kill_at=None):
        self.path, self.kill_at = path, kill_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.kill_at:
            raise Killed(f"killed at step {self.kill_at}")
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step}\n")


MAX_STEPS, PER_EPOCH, CHECKPOINT_EPOCHS = 12, 3, 2  # last.ckpt after steps 6 and 12, the last steps of epochs 1 and 3
PRETRAIN = ["experiment=digits_edm_g++", "callbacks=none", "data.num_held_out=1597", "trainer.log_every_n_steps=1",  # 200 training digits: 3 batches of 64
            f"score.max_steps={MAX_STEPS}", "score.batch_size=64", "score.warmup_steps=2",
            f"discriminator.classifier.max_steps={MAX_STEPS}", "discriminator.classifier.batch_size=64"]
PRETRAINED = {"pretrain_score": digits.pretrain_score, "pretrain_classifier": digits.pretrain_classifier}


@pytest.mark.parametrize("stage,num_workers", [("pretrain_score", 0), ("pretrain_classifier", 0), ("pretrain_score", 1)])
def test_killed_pretraining_resumes_from_the_last_epoch_checkpoint_to_the_uninterrupted_weights(compose_cfg, tmp_path,
                                                                                              monkeypatch, stage,
                                                                                              num_workers):
    def pretrained(cache, steps_file, kill_at=None):
        cfg = compose_cfg(*PRETRAIN, f"paths.cache_dir={tmp_path / cache}", f"data.num_workers={num_workers}",
                          f"+callbacks.steps={{_target_: test_resume.Steps, path: '{tmp_path / steps_file}', kill_at: {kill_at}}}")
        assert len(digits.digits(cfg, "train")[0]) // 64 == PER_EPOCH
        folder = stage_dir(cfg, stage, ["seed"])
        folder.mkdir(parents=True, exist_ok=True)
        return PRETRAINED[stage](SimpleNamespace(cfg=cfg, folder=folder)).state_dict()

    def steps(name):
        path = tmp_path / name
        return [int(line) for line in path.read_text().split()] if path.exists() else []

    monkeypatch.setattr(training, "PRETRAIN_CHECKPOINT_STEPS", 10**6)  # no checkpoint
    uninterrupted = pretrained("a", "a.txt")
    assert steps("a.txt") == list(range(MAX_STEPS))

    monkeypatch.setattr(training, "PRETRAIN_CHECKPOINT_STEPS", CHECKPOINT_EPOCHS * PER_EPOCH)
    with pytest.raises(Killed):
        pretrained("b", "killed.txt", kill_at=8)
    (folder,) = (tmp_path / "b" / "digits_edm_g++").glob(f"{stage}-*")
    assert [p.name for p in (folder / "checkpoints").iterdir()] == ["last.ckpt"]
    assert not list(folder.glob("*.pt"))
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6

    # Resumed: steps 6 to 11 only, then killed again between the last step and the weights file.
    def killed_writing(obj, path):
        raise Killed(f"killed writing {path}")

    with monkeypatch.context() as m:
        m.setattr(training, "atomic_save", killed_writing)
        with pytest.raises(Killed, match="killed writing"):
            pretrained("b", "resumed.txt")
    assert steps("killed.txt") == list(range(8)) and steps("resumed.txt") == list(range(6, MAX_STEPS))
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == MAX_STEPS

    # Resumed from the checkpoint of the last step: no step is redone, and the weights are the uninterrupted ones.
    resumed = pretrained("b", "last.txt")
    assert steps("last.txt") == []
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name

    # The loss log (metrics.csv) keeps the killed run's rows before step 6: one row per step, the uninterrupted ones.
    (done,) = (tmp_path / "a" / "digits_edm_g++").glob(f"{stage}-*")
    logged = [(done if run == "a" else folder) / "metrics.csv" for run in "ab"]
    assert logged[1].read_text() == logged[0].read_text() and len(logged[0].read_text().splitlines()) == 1 + MAX_STEPS

    # The stage's output is its weights file alone: without the checkpoints it is read as it is.
    shutil.rmtree(folder / "checkpoints")
    cached = pretrained("b", "cached.txt")
    assert steps("cached.txt") == [] and all(torch.equal(cached[name], value) for name, value in resumed.items())


def test_rng_states_refuse_a_checkpoint_of_another_number_of_ranks():
    states = RNGStates(0).state_dict()
    assert len(states["ranks"]) == 1
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    RNGStates(0).load_state_dict(RNGStates(0).state_dict())
    assert torch.equal(torch.rand(3), expected)  # one rank: its own states back
    with pytest.raises(ValueError, match="the RNG states of 2 ranks, this run has 1; resume with 2 devices"):
        RNGStates(0).load_state_dict({"ranks": states["ranks"] * 2})
