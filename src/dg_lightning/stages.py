"""Building blocks shared by the pipelines: stage caching, atomic files, loggers, discriminator training.

A stage whose output exists for the same config (its fingerprint) is loaded from paths.cache_dir
instead of rerun, so a sweep over sampling settings reuses the trained discriminator.
"""

import hashlib
import json
from pathlib import Path

import lightning as L
import torch
import wandb
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from dg_lightning.data import ArraySource, RealFakeDataModule
from dg_lightning.generate import write_atomic
from dg_lightning.guidance import DiscriminatorGuidance
from dg_lightning.module import DiscriminatorModule


def fingerprint(cfg: DictConfig, keys):
    """A short hash of the resolved config subtrees that determine a stage's output."""
    picked = {key: OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)
              if isinstance(OmegaConf.select(cfg, key), DictConfig) else OmegaConf.select(cfg, key) for key in keys}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_dir(cfg: DictConfig, stage, keys):
    """The cache folder of a stage for this config: paths.cache_dir/<experiment>/<stage>-<fingerprint>."""
    path = Path(cfg.paths.cache_dir) / cfg.experiment_name / f"{stage}-{fingerprint(cfg, keys)}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_save(obj, path: Path, save=torch.save):
    """save(obj, binary file object) through generate.write_atomic: a killed run never leaves a partial file."""
    write_atomic(path, lambda f: save(obj, f))


def write_metrics(out_dir, metrics):
    """Write metrics.json (flat keys, float values) into the run folder; returns the path."""
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


def dg_guidance(cfg: DictConfig, discriminator):
    """DiscriminatorGuidance over cfg.guidance.dg's window and clipping."""
    dg = cfg.guidance.dg
    return DiscriminatorGuidance(discriminator, t_min=dg.t_min, t_max=dg.t_max, clip=dg.clip)


def build_loggers(cfg: DictConfig):
    """The configured Lightning loggers (CSV always; W&B offline unless disabled by WANDB_MODE)."""
    return [instantiate(c) for c in (cfg.get("logger") or {}).values()]


def finish_loggers(loggers, metrics):
    """Log the final metrics to every logger and close W&B runs (so sweep jobs do not share one)."""
    for logger in loggers:
        logger.log_metrics(metrics)
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(metrics)
            wandb.finish()


def build_network(cfg: DictConfig, node):
    """Instantiate a network config right after seeding with cfg.seed: its initial weights do not depend on
    which earlier stages ran and which were loaded from the cache."""
    L.seed_everything(cfg.seed, verbose=False)
    return instantiate(node)


def fit(cfg: DictConfig, module, data, folder, loggers=(), callbacks=(), **trainer_overrides):
    """Fit a LightningModule with cfg.trainer (plus the configured callbacks) in folder; returns the trainer.

    The global RNG is re-seeded with cfg.seed first, so a stage gives the same result whether or not the
    stages before it were loaded from the cache.
    """
    L.seed_everything(cfg.seed, verbose=False)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + list(callbacks)
    trainer = instantiate(cfg.trainer, default_root_dir=str(folder), logger=list(loggers) or False, callbacks=callbacks,
                          **trainer_overrides)
    trainer.fit(module, data)
    return trainer


def train_discriminator(cfg: DictConfig, real: ArraySource, fake: ArraySource, net, loggers, keys, callbacks=()):
    """Train (or load from the stage cache) the discriminator net on real vs fake; returns the trained net."""
    folder = stage_dir(cfg, "train", keys)
    weights = folder / "discriminator.pt"
    if weights.exists():
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return net
    d = cfg.data
    datamodule = RealFakeDataModule(real, fake, batch_size=d.batch_size, t_min=d.t_min, importance=d.importance_sampling,
                                    num_workers=d.num_workers, seed=cfg.seed, conditional=cfg.discriminator.get("conditional", False))
    module = DiscriminatorModule(net, cfg.discriminator.objective, cfg.discriminator.lr, cfg.discriminator.weight_decay)
    every_epoch = ModelCheckpoint(dirpath=folder / "checkpoints", filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                                  every_n_epochs=1, save_top_k=-1, save_last=True)
    fit(cfg, module, datamodule, folder, loggers, [every_epoch, *callbacks])
    atomic_save(net.state_dict(), weights)
    return net
