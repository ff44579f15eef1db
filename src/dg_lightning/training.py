"""Training stages' building blocks: seeded networks, the Lightning fit, resumable pretraining and the discriminator's
training on real vs fake, each resuming from its stage folder's last.ckpt to the weights of an uninterrupted run.

Every checkpoint is written atomically (AtomicCheckpointIO) and checked before it is resumed from (resume_checkpoint):
a damaged last.ckpt falls back to the newest intact epoch checkpoint, or the stage starts afresh, with a warning."""

import json
import logging
import zipfile
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.loops.loop import _Loop
from omegaconf import DictConfig

from dg_lightning.accel import build_accel
from dg_lightning.callbacks import BEST_DISCRIMINATOR, EpochSeed, GuidedSamplingCallback, RNGStates
from dg_lightning.config import ConfigError
from dg_lightning.data import ArraySource, RealFakeDataModule, split_held_out
from dg_lightning.distributed import rank_and_world_size
from dg_lightning.files import atomic_save, load_weights, write_atomic
from dg_lightning.loggers import ResumableCSVLogger
from dg_lightning.module import DiscriminatorModule
from dg_lightning.pretrain import clean_loader

log = logging.getLogger(__name__)
LAST = "last.ckpt"
BEST_EPOCH = "best_epoch.json"  # in the train stage's folder: the sampling callback's pick


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, with each checkpoint written by files.write_atomic (a killed run or a full disk leaves
    the previous file whole, and ENOSPC names the file) and read with weights_only=True."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        """torch.save the checkpoint to path through a temp file in its folder, fsync and rename."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        """The checkpoint at path, on the CPU (Lightning's default), through files.load_weights whatever Lightning
        asks."""
        return load_weights(path)


def damage(path: Path):
    """Why the checkpoint at path cannot be read (not a whole zip archive, or a member failing its CRC), None when it
    is intact; nothing is unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{type(e).__name__}: {e}"
    return None if member is None else f"its member {member} fails the CRC check"


def resume_checkpoint(folder: Path):
    """The checkpoint in folder that a fit resumes from: last.ckpt when intact, else the newest intact other
    checkpoint, else None (the stage starts afresh); a warning names each damaged one and what was chosen."""
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: (p.name == LAST, p.stat().st_mtime_ns), reverse=True)
    damaged, chosen = [], None
    for path in candidates:
        problem = damage(path)
        if problem is None:
            chosen = path
            break
        damaged.append(f"{path} ({problem})")
    if damaged:
        log.warning("damaged checkpoint %s: %s", "; ".join(damaged), f"resuming from {chosen}" if chosen else
                    "no intact checkpoint is left, so the stage starts afresh (delete the damaged files to silence this)")
    return chosen


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


def configured_callbacks(cfg: DictConfig, sampling=False):
    """The callbacks of cfg.callbacks, instantiated; the guided-sampling one only with `sampling` (a discriminator's
    training with a pipeline's SamplingTask, which binds it), else left out (pretraining, a pipeline with no task)."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    return [c for c in callbacks if sampling or not isinstance(c, GuidedSamplingCallback)]


def fit(cfg: DictConfig, module, data, folder, loggers=(), callbacks=(), ckpt_path=None, seed=None, **trainer_overrides):
    """Fit a LightningModule with cfg.trainer and `callbacks` in folder, from the checkpoint at ckpt_path when given,
    through EpochEndResumeFitLoop, writing checkpoints with AtomicCheckpointIO; returns the trainer.

    The global RNG is re-seeded with `seed` (default cfg.seed) first, so a stage gives the same result whether or
    not the stages before it were loaded from the cache.
    """
    L.seed_everything(cfg.seed if seed is None else seed, verbose=False)
    trainer = instantiate(cfg.trainer, default_root_dir=str(folder), logger=list(loggers) or False, callbacks=list(callbacks),
                          plugins=[AtomicCheckpointIO()], **trainer_overrides)
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
    fit(cfg, module, loader, folder, [ResumableCSVLogger(folder, name="", version="")],
        [*configured_callbacks(cfg), checkpoint, RNGStates(cfg.seed)],
        ckpt_path=resume_checkpoint(folder / "checkpoints"), max_steps=max_steps, max_epochs=-1)
    atomic_save(network.state_dict(), weights)


def train_discriminator(cfg: DictConfig, real: ArraySource, fake: ArraySource, net, loggers, folder, task=None,
                        metrics=None):
    """Train (or load from its stage folder) the discriminator net on real vs fake, but for the last data.num_held_out
    samples of each: the held-out split of the data module (HeldOutDiagnostics); with the guided-sampling callback
    (callbacks.sampling) bound to task(), the pipeline's SamplingTask, when `task` is given (called only when the head
    trains: a cached stage loads no metric network or reference). Returns the net with the weights that guide:
    discriminator.select=last, the last epoch's (its EMA weights when discriminator.ema_decay is set), saved to
    discriminator.pt; select=best, the callback's best epoch's (<its out_dir>/best_discriminator.pt). The callback's
    pick, {sampling/best_epoch, sampling/best_<monitor>}, is added to `metrics` (a dict) when given.

    Every epoch ends with checkpoints/last.ckpt, and checkpoints.keep epoch checkpoints are kept (epoch_checkpoints);
    a killed training resumes from last.ckpt (resume_checkpoint). EpochSeed re-seeds the global RNGs (batch order,
    diffusion times and noise) at each epoch from (discriminator.seed, epoch, rank), so the resumed run ends with the
    same weights as an uninterrupted one.
    """
    folder = Path(folder)
    weights, callbacks = folder / "discriminator.pt", configured_callbacks(cfg, sampling=task is not None)
    sampling = next((c for c in callbacks if isinstance(c, GuidedSamplingCallback)), None)
    if sampling is not None:
        sampling.place(folder)
    if selects_best(cfg) and sampling is None:
        raise ConfigError("discriminator.select", "is best, but this pipeline's training has no guided-sampling "
                          "task to pick an epoch by", "use discriminator.select=last")
    if weights.exists():
        net.load_state_dict(load_weights(weights))
    else:
        d, seed = cfg.data, cfg.discriminator.seed
        (real, held_real), (fake, held_fake) = split_held_out(real, d.num_held_out), split_held_out(fake, d.num_held_out)
        datamodule = RealFakeDataModule(real, fake, batch_size=d.batch_size, t_min=d.t_min, importance=d.importance_sampling,
                                        num_workers=d.num_workers, seed=seed,
                                        conditional=cfg.discriminator.get("conditional", False),
                                        held_out=(held_real, held_fake))
        c = cfg.discriminator
        module = DiscriminatorModule(net, c.objective, c.lr, c.weight_decay, accel=build_accel(cfg.accel),
                                     lr_schedule=c.lr_schedule, ema_decay=c.ema_decay)
        if sampling is not None:
            sampling.bind(task())
        checkpoints = epoch_checkpoints(folder / "checkpoints", cfg.checkpoints.keep, callbacks)
        fit(cfg, module, datamodule, folder, loggers, [*callbacks, *checkpoints, EpochSeed(seed)],
            ckpt_path=resume_checkpoint(folder / "checkpoints"), seed=seed)
        module.average_weights()
        atomic_save(net.state_dict(), weights)
    record = {} if sampling is None else best_epoch_record(sampling, folder)
    if metrics is not None:
        metrics.update(record)
    if selects_best(cfg):
        net.load_state_dict(load_weights(sampling.out_dir / BEST_DISCRIMINATOR))
    return net


def selects_best(cfg: DictConfig):
    """Whether the head that guides is the sampling callback's best epoch (discriminator.select=best), not the last."""
    return cfg.discriminator.get("select", "last") == "best"


def selection_keys(cfg: DictConfig, scoring):
    """The keys besides its training's that a train stage's output depends on: the sampling callback's settings, and
    with discriminator.select=best the guidance and the `scoring` keys of the experiment's metrics, on which the
    picked epoch depends (select=last: DG weight and window sweeps reuse one trained head)."""
    return ("callbacks.sampling", *(("guidance", *scoring) if selects_best(cfg) else ()))


def selection_files(cfg: DictConfig, files):
    """The config keys of the scoring files (`files`) that a train stage's output depends on: with
    discriminator.select=best, the picked epoch depends on their content; none with select=last."""
    return tuple(files) if selects_best(cfg) else ()


def best_epoch_record(callback: GuidedSamplingCallback, folder: Path):
    """{sampling/best_epoch, sampling/best_<monitor>} of the callback's fit, written to folder/best_epoch.json (rank 0),
    or the record a cached stage left there ({} when none)."""
    record = folder / BEST_EPOCH
    if callback.best_epoch is None:
        return json.loads(record.read_text()) if record.exists() else {}
    found = {f"{callback.prefix}/best_epoch": callback.best_epoch,
             f"{callback.prefix}/best_{callback.monitor}": callback.best_score}
    if rank_and_world_size()[0] == 0:  # one writer under DDP (every rank's callback holds the same record)
        write_atomic(record, lambda f: f.write(json.dumps(found).encode()))
    return found


def epoch_checkpoints(dirpath: Path, keep, callbacks=()):
    """The discriminator's ModelCheckpoints: last.ckpt every epoch, and epochNNN.ckpt for the `keep` best epochs by the
    guided-sampling callback's score when callbacks hold one (saved on the epochs it evaluates, so select=best's pick
    is among them), else for the `keep` newest epochs; keep=-1 keeps every one, 0 none but last.ckpt."""
    sampling = next((c for c in callbacks if isinstance(c, GuidedSamplingCallback)), None)
    monitor, mode, every = (("epoch", "max", 1) if sampling is None else
                            (f"{sampling.prefix}/{sampling.monitor}", sampling.mode, sampling.every_n_epochs))
    kept = ModelCheckpoint(dirpath=dirpath, filename="epoch{epoch:03d}", auto_insert_metric_name=False, monitor=monitor,
                           mode=mode, every_n_epochs=every, save_top_k=keep, enable_version_counter=False)
    # Lightning writes save_last's file at an epoch's end only when a top-k file was written then: last.ckpt is a
    # checkpoint of its own, the one file of an unmonitored top 1, written after the kept one (so it holds the list of
    # kept files that a resumed run goes on pruning).
    last = ModelCheckpoint(dirpath=dirpath, filename=LAST.removesuffix(".ckpt"), every_n_epochs=1, save_top_k=1,
                           enable_version_counter=False)
    return ([kept] if keep else []) + [last]
