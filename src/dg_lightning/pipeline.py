"""The experiments' pipelines (paper Algorithms 1 and 2), wired from the Hydra config.

Stages run in order (generate fakes -> train the discriminator -> sample and evaluate); `stage=<name>`
stops after that stage. Finished stages are cached by config fingerprint (dg_lightning.stages).
"""

from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dg_lightning.config import ConfigError, validate
from dg_lightning.data import ArraySource
from dg_lightning.metrics import sliced_wasserstein
from dg_lightning.plots import toy2d_figure
from dg_lightning.samplers import edm_sampler
from dg_lightning.sde import LinearVP
from dg_lightning.stages import (atomic_save, build_loggers, dg_guidance, finish_loggers, sampler_kwargs, stage_dir,
                                 train_discriminator, write_metrics)
from dg_lightning.toy import MixtureDenoiser, OptimalDiscriminator

TOY_STAGES = ("generate", "train", "sample")


def _generator(seed, offset):
    """A CPU generator for one named random stream of the run (real data, fakes, evaluation latents, ...)."""
    return torch.Generator().manual_seed(seed * 1000 + offset)


def mean_log_ratio_curves(discriminator, samples, taus, vp=LinearVP(), seed=0):
    """Mean log(d / (1 - d)) over each named sample set diffused to each VP time tau (the paper's Figure 8)."""
    generator = torch.Generator().manual_seed(seed)
    curves = {}
    with torch.no_grad():
        for name, x0 in samples.items():
            values = []
            for tau in taus:
                t = torch.full((x0.shape[0],), float(tau))
                x_t = vp.diffuse(x0, t, torch.randn(x0.shape, generator=generator))
                values.append(discriminator(x_t, t).mean().item())
            curves[name] = values
    return curves


def run_toy2d(cfg: DictConfig):
    """The toy 2-D experiment: exact wrong score -> fakes -> MLP discriminator -> sampling with no DG, DG and the optimal d*."""
    data, model = instantiate(cfg.data.mixture), instantiate(cfg.score.mixture)
    if data.dim != model.dim:
        raise ConfigError("score.mixture.means", f"the model is {model.dim}-D but the data are {data.dim}-D", "give both mixtures the same dimension")
    L.seed_everything(cfg.seed, verbose=False)
    out_dir, stop = cfg.paths.output_dir, TOY_STAGES.index(cfg.stage) if cfg.stage != "all" else len(TOY_STAGES) - 1
    loggers = build_loggers(cfg)
    denoiser = MixtureDenoiser(model)
    unguided = {k: v for k, v in sampler_kwargs(cfg).items() if k not in ("w1", "w2", "boosting")}

    # Stage 1: fakes x0 ~ q through the model's PF-ODE (no guidance).
    fakes_file = stage_dir(cfg, "generate", ["seed", "score", "sampler", "data.num_fake"]) / "fakes.pt"
    if not fakes_file.exists():
        latents = torch.randn(cfg.data.num_fake, data.dim, generator=_generator(cfg.seed, 1))
        atomic_save(edm_sampler(denoiser, latents, progress=True, **unguided), fakes_file)
    fakes = torch.load(fakes_file, weights_only=True)
    metrics = {}
    if stop >= 1:
        # Stage 2: the discriminator on real vs fake, diffused on the fly.
        real = data.sample(cfg.data.num_real, generator=_generator(cfg.seed, 0))
        net = train_discriminator(cfg, ArraySource(real.numpy(), name="data.mixture samples"), ArraySource(fakes.numpy(), name="fakes"),
                                  instantiate(cfg.discriminator.net), loggers,
                                  keys=["seed", "data", "score", "sampler", "discriminator", "trainer.max_steps", "trainer.max_epochs"])
    if stop >= 2:
        # Stage 3: the same latents sampled with no DG, the trained discriminator, and the exact d*.
        n = cfg.metrics.num_samples
        latents = torch.randn(n, data.dim, generator=_generator(cfg.seed, 2))
        reference, floor = data.sample(n, _generator(cfg.seed, 3)), data.sample(n, _generator(cfg.seed, 4))
        guided = dict(sampler_kwargs(cfg), progress=True)
        samples = {
            "no_dg": edm_sampler(denoiser, latents, progress=True, **unguided),
            "dg": edm_sampler(denoiser, latents, guidance=dg_guidance(cfg, net), **guided),
            "dg_optimal": edm_sampler(denoiser, latents, guidance=dg_guidance(cfg, OptimalDiscriminator(data, model)), **guided),
        }
        swd = lambda x, y: sliced_wasserstein(x, y, cfg.metrics.num_projections, seed=cfg.seed)  # noqa: E731
        metrics = {f"toy/swd_{name}": swd(x, reference) for name, x in samples.items()}
        metrics["toy/swd_floor"] = swd(floor, reference)
        taus = torch.linspace(cfg.guidance.dg.t_min, cfg.guidance.dg.t_max, 40).tolist()
        curves = mean_log_ratio_curves(net, {"real": reference, "fake": samples["no_dg"], "guided (DG)": samples["dg"]}, taus, seed=cfg.seed)
        toy2d_figure(reference, samples, taus, curves, metrics, f"{out_dir}/toy2d.png")
    write_metrics(out_dir, metrics)
    finish_loggers(loggers, metrics)
    return metrics


PIPELINES = {"toy2d": run_toy2d}


def run(cfg: DictConfig):
    """Validate the config before any compute, then run the experiment's pipeline; returns its metrics."""
    validate(cfg)
    if cfg.pipeline not in PIPELINES:
        raise ConfigError("pipeline", f"unknown pipeline {cfg.pipeline!r}", f"use one of {sorted(PIPELINES)}")
    stages = {"toy2d": TOY_STAGES}[cfg.pipeline]
    if cfg.stage != "all" and cfg.stage not in stages:
        raise ConfigError("stage", f"unknown stage {cfg.stage!r} for pipeline {cfg.pipeline}", f"use all or one of {list(stages)}")
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.paths.output_dir) / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return PIPELINES[cfg.pipeline](cfg)
