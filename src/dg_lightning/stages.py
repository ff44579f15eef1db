"""Building blocks shared by the pipelines: stage caching, atomic files, resumable pretraining, discriminator training.

A stage whose output exists for the same config (its fingerprint) is loaded from paths.cache_dir
instead of rerun, so a sweep over sampling settings reuses the trained discriminator.
"""

import hashlib
import json
import os
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from dg_lightning.accel import Accel, accelerate, set_backends
from dg_lightning.callbacks import EpochSeed, RNGStates
from dg_lightning.config import ConfigError
from dg_lightning.data import ArraySource, RealFakeDataModule
from dg_lightning.generate import MANIFEST, barrier, rank_and_world_size, read_manifest, write_atomic
from dg_lightning.guidance import DiscriminatorGuidance
from dg_lightning.loggers import ResumableCSVLogger
from dg_lightning.module import DiscriminatorModule
from dg_lightning.pretrain import clean_loader


def fingerprint(cfg: DictConfig, keys, inputs=()):
    """A short hash of the resolved config subtrees that determine a stage's output, and of the manifests of the
    sharded stage folders `inputs` it reads (generate.MANIFEST): regenerated inputs give another hash."""
    picked = {key: OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)
              if isinstance(OmegaConf.select(cfg, key), DictConfig) else OmegaConf.select(cfg, key) for key in keys}
    if inputs:
        picked["inputs"] = [read_manifest(Path(folder) / MANIFEST) for folder in inputs]
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_dir(cfg: DictConfig, stage, keys, inputs=()):
    """The cache folder of a stage for this config and these input folders (see fingerprint):
    paths.cache_dir/<experiment>/<stage>-<fingerprint>."""
    path = Path(cfg.paths.cache_dir) / cfg.experiment_name / f"{stage}-{fingerprint(cfg, keys, inputs)}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_save(obj, path: Path, save=torch.save):
    """save(obj, binary file object) through generate.write_atomic: a killed run never leaves a partial file.

    Under torch.distributed every rank calls it with the same object: rank 0 writes, the others wait at a barrier.
    """
    if rank_and_world_size()[0] == 0:
        write_atomic(path, lambda f: save(obj, f))
    barrier()


def write_metrics(out_dir, metrics):
    """Write metrics.json (flat keys, float values) into the run folder (rank 0); returns the path."""
    path = Path(out_dir) / "metrics.json"
    atomic_save({k: float(v) for k, v in sorted(metrics.items())}, path,
                save=lambda obj, f: f.write((json.dumps(obj, indent=2) + "\n").encode()))
    return path


def sampler_kwargs(cfg: DictConfig, guided=True):
    """The edm_sampler keyword arguments of cfg.sampler, plus cfg.guidance.dg's weights and boosting when guided."""
    kwargs = OmegaConf.to_container(cfg.sampler, resolve=True)
    if not guided:
        return kwargs
    dg = cfg.guidance.dg
    return dict(kwargs, w1=dg.weight, w2=dg.weight_2nd, boosting=dg.boosting)


def build_accel(cfg: DictConfig):
    """How the networks run (cfg.accel: the GPU fast path or the plain float32 path), with its TF32 and cuDNN settings applied."""
    accel = Accel(**OmegaConf.to_container(cfg.accel, resolve=True)) if cfg.get("accel") else Accel()
    set_backends(accel)
    return accel


def dg_guidance(cfg: DictConfig, discriminator):
    """DiscriminatorGuidance over cfg.guidance.dg's window and clipping, the discriminator run as cfg.accel says."""
    dg = cfg.guidance.dg
    return DiscriminatorGuidance(accelerate(discriminator, build_accel(cfg)), t_min=dg.t_min, t_max=dg.t_max, clip=dg.clip)


def _external_launcher():
    """Whether the ranks were started outside this process (torchrun, SLURM srun/submitit, or Lightning's own launcher)."""
    return "LOCAL_RANK" in os.environ or SLURMEnvironment.detect() or TorchElasticEnvironment.detect()


def launch(cfg: DictConfig):
    """Start this run's ranks before the first stage when cfg.trainer.strategy is "ddp": every rank then runs the whole
    pipeline (sharded generation, DDP training, sharded sampling, synchronised metrics) in one process group.

    On one machine the other local ranks are this script started again by Lightning (as trainer.fit would); under
    torchrun or SLURM they exist already and only the process group is set up. A Hydra multirun on one machine cannot
    re-start its jobs, so it must get its ranks from SLURM (hydra/launcher=slurm) or use one process per point.
    """
    t = cfg.trainer
    if t.get("strategy", "auto") != "ddp" or torch.distributed.is_initialized():
        return
    if not _external_launcher() and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError("trainer.strategy", "ddp in a local Hydra multirun (-m) would start every rank on the whole "
                          "sweep again", "sweep with hydra/launcher=slurm (SLURM starts each point's ranks), or run the "
                          "points one by one without -m, or sweep on one device per point (trainer=default or gpu)")
    L.Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.get("num_nodes", 1), strategy="ddp").launch()


def build_network(cfg: DictConfig, node, seed=None):
    """Instantiate a network config right after seeding with `seed` (default cfg.seed): its initial weights do not
    depend on which earlier stages ran and which were loaded from the cache."""
    L.seed_everything(cfg.seed if seed is None else seed, verbose=False)
    return instantiate(node)


def fit(cfg: DictConfig, module, data, folder, loggers=(), callbacks=(), ckpt_path=None, seed=None, **trainer_overrides):
    """Fit a LightningModule with cfg.trainer (plus the configured callbacks) in folder, from the checkpoint at
    ckpt_path when given; returns the trainer.

    The global RNG is re-seeded with `seed` (default cfg.seed) first, so a stage gives the same result whether or
    not the stages before it were loaded from the cache.
    """
    L.seed_everything(cfg.seed if seed is None else seed, verbose=False)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + list(callbacks)
    trainer = instantiate(cfg.trainer, default_root_dir=str(folder), logger=list(loggers) or False, callbacks=callbacks,
                          **trainer_overrides)
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
    checkpoint = ModelCheckpoint(dirpath=folder / "checkpoints", save_top_k=0, save_last=True, enable_version_counter=False,
                                 every_n_train_steps=per_epoch * max(1, round(PRETRAIN_CHECKPOINT_STEPS / per_epoch)))
    last = folder / "checkpoints" / "last.ckpt"
    fit(cfg, module, loader, folder, [ResumableCSVLogger(folder, name="", version="")], [checkpoint, RNGStates(cfg.seed)],
        ckpt_path=last if last.exists() else None, max_steps=max_steps, max_epochs=-1)
    atomic_save(network.state_dict(), weights)


def train_discriminator(cfg: DictConfig, real: ArraySource, fake: ArraySource, net, loggers, folder, callbacks=()):
    """Train (or load from its stage folder, stage_dir(cfg, "train", keys, inputs) with the folders of the fakes and
    of sharded real data as inputs) the discriminator net on real vs fake; returns the trained net.

    Every epoch ends with a checkpoint (checkpoints/epochNNN.ckpt and last.ckpt); a killed training resumes from
    last.ckpt. EpochSeed re-seeds the global RNGs (batch order, diffusion times and noise) at each epoch from
    (discriminator.seed, epoch, rank), so the resumed run ends with the same weights as an uninterrupted one.
    """
    weights = folder / "discriminator.pt"
    if weights.exists():
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return net
    d, seed = cfg.data, cfg.discriminator.seed
    datamodule = RealFakeDataModule(real, fake, batch_size=d.batch_size, t_min=d.t_min, importance=d.importance_sampling,
                                    num_workers=d.num_workers, seed=seed, conditional=cfg.discriminator.get("conditional", False))
    module = DiscriminatorModule(net, cfg.discriminator.objective, cfg.discriminator.lr, cfg.discriminator.weight_decay,
                                 accel=build_accel(cfg))
    every_epoch = ModelCheckpoint(dirpath=folder / "checkpoints", filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                                  every_n_epochs=1, save_top_k=-1, save_last=True)
    last = folder / "checkpoints" / "last.ckpt"
    fit(cfg, module, datamodule, folder, loggers, [every_epoch, EpochSeed(seed), *callbacks],
        ckpt_path=last if last.exists() else None, seed=seed)
    atomic_save(net.state_dict(), weights)
    return net


def finished_metrics(cfg: DictConfig):
    """The metrics of a finished run of this config in paths.output_dir (its metrics.json, when the resolved_config.yaml
    beside it matches this config up to the loggers, whose W&B group holds the launch time), else None: a re-launched
    sweep (the same hydra.sweep.dir) skips the points that finished."""
    out_dir = Path(cfg.paths.output_dir)
    metrics, saved = out_dir / "metrics.json", out_dir / "resolved_config.yaml"
    if not (metrics.is_file() and saved.is_file()):
        return None
    without_loggers = lambda c: {k: v for k, v in OmegaConf.to_container(c, resolve=True).items() if k != "logger"}
    if without_loggers(OmegaConf.load(saved)) != without_loggers(cfg):
        return None
    return json.loads(metrics.read_text())
