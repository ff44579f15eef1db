"""Training stages' building blocks: seeded networks, the Lightning fit, resumable pretraining and the discriminator's
training on real vs fake, each resuming from its stage folder's last.ckpt to the weights of an uninterrupted run."""

from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.loops.loop import _Loop
from omegaconf import DictConfig

from dg_lightning.accel import build_accel
from dg_lightning.callbacks import EpochSeed, RNGStates
from dg_lightning.data import ArraySource, RealFakeDataModule
from dg_lightning.files import atomic_save
from dg_lightning.loggers import ResumableCSVLogger
from dg_lightning.module import DiscriminatorModule
from dg_lightning.pretrain import clean_loader


def build_network(cfg: DictConfig, node, seed=None):
    """Instantiate a network config right after seeding with `seed` (default cfg.seed): its initial weights do not
    depend on which earlier stages ran and which were loaded from the cache."""
    L.seed_everything(cfg.seed if seed is None else seed, verbose=False)
    return instantiate(node)


class EpochEndResumeFitLoop(_FitLoop):
    """Lightning's fit loop, except that a checkpoint saved at an epoch's end resumes at the next epoch also when
    training is bounded by trainer.max_steps.

    Lightning marks every resume of step-bounded training as restarting, so from an epoch-end checkpoint it runs one
    more batch of the finished epoch and the resumed weights differ from an uninterrupted run's; here a resume is
    restarting only when the checkpoint's epoch is unfinished (as for epoch-bounded training).
    """

    @_FitLoop.restarting.setter
    def restarting(self, restarting: bool) -> None:
        current = self.epoch_progress.current
        unfinished = current.ready != current.processed or current.started != current.processed
        _Loop.restarting.fset(self, restarting and unfinished)


def fit(cfg: DictConfig, module, data, folder, loggers=(), callbacks=(), ckpt_path=None, seed=None, **trainer_overrides):
    """Fit a LightningModule with cfg.trainer (plus the configured callbacks) in folder, from the checkpoint at
    ckpt_path when given, through EpochEndResumeFitLoop; returns the trainer.

    The global RNG is re-seeded with `seed` (default cfg.seed) first, so a stage gives the same result whether or
    not the stages before it were loaded from the cache.
    """
    L.seed_everything(cfg.seed if seed is None else seed, verbose=False)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + list(callbacks)
    trainer = instantiate(cfg.trainer, default_root_dir=str(folder), logger=list(loggers) or False, callbacks=callbacks,
                          **trainer_overrides)
    loop = EpochEndResumeFitLoop(trainer, min_epochs=trainer.fit_loop.min_epochs, max_epochs=trainer.fit_loop.max_epochs)
    loop.epoch_loop, trainer.fit_loop = trainer.fit_loop.epoch_loop, loop
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


PRETRAIN_CHECKPOINT_STEPS = 200  # about this many optimiser steps between pretraining checkpoints, in whole epochs


def pretrain(cfg: DictConfig, module, source: ArraySource, batch_size, max_steps, network, weights: Path):
    """Fit module for max_steps optimiser steps on clean batches of source (pretrain.clean_loader, cfg.data.num_workers
    workers) in weights.parent (CSV log there), then atomic_save the state dict of network (the part of module that the
    stage exports, e.g. its EMA copy) to weights.

    Every k steps, k = PRETRAIN_CHECKPOINT_STEPS rounded to whole epochs (at least one), checkpoints/last.ckpt (the only
    checkpoint kept) is rewritten with every rank's global RNG states (RNGStates, which also seeds the ranks apart);
    a killed run resumes from it. Lightning resumes a checkpoint from an epoch's last step where the run stood (from a
    step inside an epoch it would restart the epoch's loader), so the resumed run ends with the weights of an
    uninterrupted one, on any number of ranks and with loader workers (pretrain.clean_loader's start every epoch).
    """
    loader = clean_loader(source, batch_size, num_workers=cfg.data.num_workers)
    folder, per_epoch = weights.parent, len(loader)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = ModelCheckpoint(dirpath=folder / "checkpoints", save_top_k=0, save_last=True, enable_version_counter=False,
                                 every_n_train_steps=per_epoch * max(1, round(PRETRAIN_CHECKPOINT_STEPS / per_epoch)))
    last = folder / "checkpoints" / "last.ckpt"
    fit(cfg, module, loader, folder, [ResumableCSVLogger(folder, name="", version="")], [checkpoint, RNGStates(cfg.seed)],
        ckpt_path=last if last.exists() else None, max_steps=max_steps, max_epochs=-1)
    atomic_save(network.state_dict(), weights)


def train_discriminator(cfg: DictConfig, real: ArraySource, fake: ArraySource, net, loggers, folder, callbacks=()):
    """Train (or load from its stage folder) the discriminator net on real vs fake; returns the trained net.

    Every epoch ends with a checkpoint (checkpoints/epochNNN.ckpt and last.ckpt); a killed training resumes from
    last.ckpt. EpochSeed re-seeds the global RNGs (batch order, diffusion times and noise) at each epoch from
    (discriminator.seed, epoch, rank), so the resumed run ends with the same weights as an uninterrupted one.
    """
    weights = Path(folder) / "discriminator.pt"
    if weights.exists():
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return net
    d, seed = cfg.data, cfg.discriminator.seed
    datamodule = RealFakeDataModule(real, fake, batch_size=d.batch_size, t_min=d.t_min, importance=d.importance_sampling,
                                    num_workers=d.num_workers, seed=seed, conditional=cfg.discriminator.get("conditional", False))
    module = DiscriminatorModule(net, cfg.discriminator.objective, cfg.discriminator.lr, cfg.discriminator.weight_decay,
                                 accel=build_accel(cfg.accel))
    every_epoch = ModelCheckpoint(dirpath=folder / "checkpoints", filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                                  every_n_epochs=1, save_top_k=-1, save_last=True)
    last = folder / "checkpoints" / "last.ckpt"
    fit(cfg, module, datamodule, folder, loggers, [every_epoch, EpochSeed(seed), *callbacks],
        ckpt_path=last if last.exists() else None, seed=seed)
    atomic_save(net.state_dict(), weights)
    return net

