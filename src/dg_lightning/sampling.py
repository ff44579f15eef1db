"""The one sampler builder: cfg.sampler.solver picks a registered sampler (solvers.SOLVERS), cfg.sampler gives its
settings and cfg.guidance.dg every DG setting, so every pipeline samples through build_sampler.

The DG settings are passed as dg_<name> for each guidance.dg.<name> that the sampler takes (t_min, t_max and clip
build the DiscriminatorGuidance term itself); a setting the sampler does not take must stay at its neutral value
(DG_NEUTRAL, or for weight_2nd the value of weight: one weight on every slope, what a one-weight sampler applies),
and check_sampler says so before any compute. Every sample_fn counts the score model's evaluations per batch (its NFE).
"""

import inspect

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dg_lightning import ddpm, ode, samplers
from dg_lightning.accel import accelerate, build_accel
from dg_lightning.config import ConfigError
from dg_lightning.guidance import DiscriminatorGuidance
from dg_lightning.solvers import SCORE_KINDS, SOLVERS

SAMPLER_MODULES = (samplers, ddpm, ode)  # the package's samplers: importing them registers their solvers
DG_TERM = ("t_min", "t_max", "clip")  # guidance.dg settings of the DiscriminatorGuidance term
DG_NEUTRAL = {"weight_2nd": 0.0, "boosting": False, "switch_step": 0, "boost": 1.0, "norm_ratio": False}
DG_UNIFORM = {"weight_2nd": "weight"}  # also neutral when equal to that setting: the same weight on every slope
CONVENTION = ("score_model", "latents", "class_labels", "dg", "randn_like", "progress")


def _parameters(sample):
    """The keyword parameters of a sampler function (its settings and dg_* settings)."""
    return set(inspect.signature(sample).parameters)


def check_sampler(cfg: DictConfig):
    """ConfigError before any compute for an unknown solver, a solver for another kind of score model than score.kind,
    a sampler setting the solver does not take, or a DG setting it cannot apply that is not at its neutral value."""
    s, kind = cfg.sampler, cfg.score.get("kind")
    if s.solver not in SOLVERS:
        raise ConfigError("sampler.solver", f"unknown solver {s.solver!r}", f"use one of {sorted(SOLVERS)}")
    solver = SOLVERS[s.solver]
    if solver.score != kind:
        fitting = sorted(name for name, other in SOLVERS.items() if other.score == kind)
        raise ConfigError("sampler.solver", f"{s.solver!r} samples a score model of kind {solver.score!r} "
                          f"({SCORE_KINDS[solver.score]}), but score.kind is {kind!r}",
                          f"use a sampler config with a solver for {kind!r} models, one of {fitting}")
    accepted = _parameters(solver.sample)
    for key in s:
        if key != "solver" and key not in accepted:
            raise ConfigError(f"sampler.{key}", f"the {s.solver!r} sampler has no setting {key!r}",
                              "remove it, or pick the sampler config that has it (conf/sampler/)")
    dg = cfg.guidance.dg
    for key, value in dg.items():
        if key in DG_TERM or f"dg_{key}" in accepted:
            continue
        uniform = key in DG_UNIFORM and f"dg_{DG_UNIFORM[key]}" in accepted and value == dg[DG_UNIFORM[key]]
        if key not in DG_NEUTRAL or (value != DG_NEUTRAL[key] and not uniform):
            same = f" or to guidance.dg.{DG_UNIFORM[key]}" if key in DG_UNIFORM else ""
            raise ConfigError(f"guidance.dg.{key}", f"is {value} but the {s.solver!r} sampler cannot apply it",
                              f"set it to {DG_NEUTRAL.get(key)} (off){same} or use a sampler that has dg_{key}")


def dg_guidance(cfg: DictConfig, discriminator):
    """DiscriminatorGuidance over guidance.dg's window and clipping, the discriminator run as cfg.accel says."""
    dg = cfg.guidance.dg
    return DiscriminatorGuidance(accelerate(discriminator, build_accel(cfg.accel)), t_min=dg.t_min, t_max=dg.t_max,
                                 clip=dg.clip)


def build_sampler(cfg: DictConfig, score_model, discriminator=None, progress=False, **overrides):
    """generate's sample_fn(latents, class_labels, noise) of cfg.sampler's solver on score_model (run as cfg.accel
    says), with DG by `discriminator` and guidance.dg's settings when one is given (else unguided); `overrides`
    replace or add settings (e.g. DiT's constant CFG scale for the fakes, ADM's classifier guidance term)."""
    solver = SOLVERS[cfg.sampler.solver]
    settings = {key: value for key, value in cfg.sampler.items() if key != "solver"}
    settings = {**instantiate(OmegaConf.create(settings), _convert_="all"), **solver.fixed, **overrides}  # e.g. the DDPM schedule
    if discriminator is not None:
        accepted = _parameters(solver.sample)
        settings["dg"] = dg_guidance(cfg, discriminator)
        settings.update({f"dg_{key}": value for key, value in cfg.guidance.dg.items() if f"dg_{key}" in accepted})
    return SampleFn(solver.sample, accelerate(score_model, build_accel(cfg.accel)), settings, progress)


class SampleFn:
    """generate's sample_fn(latents, class_labels, noise) of one sampler; nfe lists the score model's evaluations in
    each batch it sampled (the sampler's NFE: 2 num_steps - 1 for EDM's Heun, 2 + 6 steps for RK45)."""

    def __init__(self, sample, model, settings, progress=False):
        self.sample, self.model, self.settings, self.progress, self.nfe = sample, model, settings, progress, []

    def __call__(self, latents, class_labels, noise=None):
        """Samples from latents z ~ N(0, I), later noise from the samples' own streams (seeds.SampleNoise; None:
        torch's global generator)."""
        randn_like = torch.randn_like if noise is None else noise.randn_like
        calls = 0

        def counted(*args, **kwargs):
            """The score model, counting its evaluations."""
            nonlocal calls
            calls += 1
            return self.model(*args, **kwargs)

        samples = self.sample(counted, latents, class_labels, randn_like=randn_like, progress=self.progress,
                              **self.settings)
        self.nfe.append(calls)
        return samples
