"""The experiments' pipelines: every module of this package that defines PIPELINE is one (found, not listed), and
run(cfg) runs cfg.pipeline's stages through the one runner (pipelines.recipe)."""

import importlib
import pkgutil

from omegaconf import DictConfig

from dg_lightning.config import ConfigError, validate
from dg_lightning.pipelines.recipe import run_pipeline
from dg_lightning.sampling import check_sampler


def pipelines():
    """{name: Pipeline} of every module in this package that defines PIPELINE."""
    found = {}
    for module in pkgutil.iter_modules(__path__):
        pipeline = getattr(importlib.import_module(f"{__name__}.{module.name}"), "PIPELINE", None)
        if pipeline is not None:
            found[pipeline.name] = pipeline
    return found


def run(cfg: DictConfig):
    """Check cfg (sampling.check_sampler, config.validate) before any compute, then run the experiment's pipeline
    (cfg.pipeline) through the runner; returns its metrics."""
    check_sampler(cfg)
    validate(cfg)
    known = pipelines()
    if cfg.pipeline not in known:
        raise ConfigError("pipeline", f"unknown pipeline {cfg.pipeline!r}", f"use one of {sorted(known)}")
    return run_pipeline(cfg, known[cfg.pipeline])
