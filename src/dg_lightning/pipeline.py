"""The experiments' pipelines (paper Algorithms 1 and 2), wired from the Hydra config.

Stages run in order (generate fakes -> train the discriminator -> sample and evaluate); `stage=<name>`
stops after that stage. Finished stages are cached by config fingerprint (dg_lightning.stages).
"""

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from dg_lightning.callbacks import BEST_DISCRIMINATOR, GuidedSamplingCallback
from dg_lightning.config import ConfigError, validate
from dg_lightning.data import ArraySource, load_digits_split
from dg_lightning.generate import generate, load_shards
from dg_lightning.metrics import ClassifierFeatures, GenerativeMetrics, sliced_wasserstein
from dg_lightning.nets.adm import Discriminator
from dg_lightning.plots import image_grid, toy2d_figure
from dg_lightning.pretrain import NoisyClassifierModule, ScoreModule, clean_loader, train_feature_classifier
from dg_lightning.samplers import edm_sampler
from dg_lightning.sde import LinearVP
from dg_lightning.stages import (atomic_save, build_loggers, build_network, dg_guidance, fingerprint, finish_loggers, fit,
                                 sampler_kwargs, stage_dir, train_discriminator, write_metrics)
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
    unguided = sampler_kwargs(cfg, guided=False)

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
                                  build_network(cfg, cfg.discriminator.net), loggers,
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


DIGITS_STAGES = ("pretrain_score", "pretrain_classifier", "generate", "train", "sample")
DIGITS_DATA_KEYS = ["data.num_held_out", "data.split_seed"]
UNGUIDED_KEYS = ["seed", "score", "sampler", "metrics.num_samples", "metrics.sampling_seed", *DIGITS_DATA_KEYS]  # shared by DG sweeps


def _frozen(net, weights):
    """net with the state dict in `weights` (weights_only), in eval mode, without parameter gradients."""
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval().requires_grad_(False)


def pretrained_score(cfg: DictConfig, train: ArraySource):
    """Stage pretrain_score: the EDM denoiser (EMA weights) trained with the EDM loss on the training digits."""
    folder = stage_dir(cfg, "pretrain_score", ["seed", "score", *DIGITS_DATA_KEYS])
    weights = folder / "score_ema.pt"
    if not weights.exists():
        s = cfg.score
        module = ScoreModule(build_network(cfg, s.net), instantiate(s.loss), lr=s.lr, warmup_steps=s.warmup_steps,
                             ema_halflife_images=s.ema_halflife_images)
        fit(cfg, module, clean_loader(train, s.batch_size), folder, [CSVLogger(folder, name="", version="")],
            max_steps=s.max_steps, max_epochs=-1)
        atomic_save(module.ema_network().state_dict(), weights)
    return _frozen(instantiate(cfg.score.net), weights)


def pretrained_classifier(cfg: DictConfig, train: ArraySource):
    """Stage pretrain_classifier: the noise-aware EncoderUNet p(y | x_t, t) on LVP-noised training digits."""
    c = cfg.discriminator.classifier
    folder = stage_dir(cfg, "pretrain_classifier", ["seed", "discriminator.classifier", "data.t_min", *DIGITS_DATA_KEYS])
    weights = folder / "classifier.pt"
    if not weights.exists():
        module = NoisyClassifierModule(build_network(cfg, c.net), lr=c.lr, weight_decay=c.weight_decay, t_min=cfg.data.t_min)
        fit(cfg, module, clean_loader(train, c.batch_size), folder, [CSVLogger(folder, name="", version="")],
            max_steps=c.max_steps, max_epochs=-1)
        atomic_save(module.classifier.state_dict(), weights)
    return _frozen(instantiate(c.net), weights)


def sample_images(cfg: DictConfig, denoiser, folder, num_samples, base_seed, discriminator=None):
    """Images from the EDM sampler (with DG when a discriminator is given) through the sharded, resumable generator."""
    guided = discriminator is not None
    kwargs = sampler_kwargs(cfg, guided)
    guidance = dg_guidance(cfg, discriminator) if guided else None

    def sample_fn(latents, class_labels, noise):
        return edm_sampler(denoiser, latents, None, guidance, randn_like=noise.randn_like, **kwargs)

    shape = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
    generate(sample_fn, folder, num_samples, shape, base_seed=base_seed, batch_size=cfg.metrics.batch_size,
             fingerprint=fingerprint(cfg, ["sampler", "guidance"] if guided else ["sampler"]))
    return load_shards(folder)[0]


def digits_metrics(features, reference, images):
    """FID / precision / recall of uint8 NHWC images against the reference images in a feature space."""
    metrics = GenerativeMetrics(features)
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    metrics.update(nchw(reference), real=True)
    metrics.update(nchw(images), real=False)
    return metrics.compute()


def feature_network(cfg: DictConfig, images, labels):
    """Stage feature_net: the metrics' digits classifier, trained on the clean training digits (never DG's own networks)."""
    m = cfg.metrics
    weights = stage_dir(cfg, "feature_net", ["metrics.feature_net", "metrics.feature_steps", *DIGITS_DATA_KEYS]) / "feature_net.pt"
    if not weights.exists():
        atomic_save(train_feature_classifier(build_network(cfg, m.feature_net), images, labels, m.feature_steps).state_dict(),
                    weights)
    return _frozen(instantiate(m.feature_net), weights)


def sampling_callback(cfg: DictConfig, denoiser, features, real_images, folder):
    """GuidedSamplingCallback: every few epochs, DG samples from the current discriminator, scored against real images."""
    c = cfg.metrics.sampling_callback
    kwargs = sampler_kwargs(cfg)

    def sample_fn(discriminator, latents, class_labels, noise):
        return edm_sampler(denoiser, latents, None, dg_guidance(cfg, discriminator), randn_like=noise.randn_like, **kwargs)

    shape = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
    return GuidedSamplingCallback(
        sample_fn, GenerativeMetrics(features, reset_real_features=False), shape, c.num_samples, folder / "sampling",
        real_images=torch.from_numpy(real_images).permute(0, 3, 1, 2), every_n_epochs=c.every_n_epochs,
        batch_size=cfg.metrics.batch_size, base_seed=c.seed, monitor="fid", mode="min")


def best_epoch_record(callback, folder):
    """{sampling/best_epoch, sampling/best_fid}, from this fit or (for a cached stage) from the record it left."""
    record = folder / "best_epoch.json"
    if callback.best_epoch is not None:
        record.write_text(json.dumps({"sampling/best_epoch": callback.best_epoch, "sampling/best_fid": callback.best_score}))
    return json.loads(record.read_text()) if record.exists() else {}


def run_digits(cfg: DictConfig):
    """The digits experiment: pretrain score model and classifier -> fakes -> DG head -> sample with/without DG -> evaluate."""
    d = cfg.data
    train_images, train_labels = load_digits_split("train", d.num_held_out, d.split_seed)
    held_out, _ = load_digits_split("held_out", d.num_held_out, d.split_seed)
    train = ArraySource(train_images, train_labels, name="digits train split")
    L.seed_everything(cfg.seed, verbose=False)
    stop = DIGITS_STAGES.index(cfg.stage) if cfg.stage != "all" else len(DIGITS_STAGES) - 1
    out_dir, metrics, loggers = Path(cfg.paths.output_dir), {}, build_loggers(cfg)

    denoiser = pretrained_score(cfg, train)
    classifier = pretrained_classifier(cfg, train) if stop >= 1 else None
    if stop >= 2:
        fake_dir = stage_dir(cfg, "generate", ["seed", "score", "sampler", "data.num_fake", *DIGITS_DATA_KEYS])
        fakes = sample_images(cfg, denoiser, fake_dir, d.num_fake, base_seed=cfg.seed)
    if stop >= 3:
        features = ClassifierFeatures(feature_network(cfg, train_images, train_labels), head="fc")
        discriminator = Discriminator(classifier, build_network(cfg, cfg.discriminator.head))
        keys = ["seed", "score", "sampler", "data", "trainer.max_epochs", "trainer.max_steps", "metrics.feature_net",
                "metrics.feature_steps", "metrics.sampling_callback",
                *(f"discriminator.{k}" for k in cfg.discriminator if k != "select")]  # select only picks the weights used
        train_dir = stage_dir(cfg, "train", keys)
        callback = sampling_callback(cfg, denoiser, features, held_out, train_dir)
        discriminator = train_discriminator(cfg, train, ArraySource(fakes, name=f"fakes in {fake_dir}"), discriminator,
                                            loggers, keys, callbacks=[callback])
        metrics.update(best_epoch_record(callback, train_dir))
        if cfg.discriminator.select == "best":
            discriminator = _frozen(discriminator, callback.out_dir / BEST_DISCRIMINATOR)
    if stop >= 4:
        m = cfg.metrics
        discriminator.eval().requires_grad_(False)
        samples = {
            "eval": sample_images(cfg, denoiser, out_dir / "samples_dg", m.num_samples, m.sampling_seed, discriminator),
            "eval_unguided": sample_images(cfg, denoiser, stage_dir(cfg, "sample_unguided", UNGUIDED_KEYS), m.num_samples,
                                           m.sampling_seed),
            "eval_floor": train_images[np.random.default_rng(m.sampling_seed).permutation(len(train_images))[:m.num_samples]],
        }
        for prefix, images in samples.items():
            scores = digits_metrics(features, held_out, images)
            metrics.update({f"{prefix}/{k}": v for k, v in scores.items() if prefix != "eval_floor" or k == "fid"})
        image_grid(samples, out_dir / "digits_samples.png")
    write_metrics(out_dir, metrics)
    finish_loggers(loggers, metrics)
    return metrics


PIPELINES = {"toy2d": run_toy2d, "digits": run_digits}


def run(cfg: DictConfig):
    """Validate the config before any compute, then run the experiment's pipeline; returns its metrics."""
    validate(cfg)
    if cfg.pipeline not in PIPELINES:
        raise ConfigError("pipeline", f"unknown pipeline {cfg.pipeline!r}", f"use one of {sorted(PIPELINES)}")
    stages = {"toy2d": TOY_STAGES, "digits": DIGITS_STAGES}[cfg.pipeline]
    if cfg.stage != "all" and cfg.stage not in stages:
        raise ConfigError("stage", f"unknown stage {cfg.stage!r} for pipeline {cfg.pipeline}", f"use all or one of {list(stages)}")
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.paths.output_dir) / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return PIPELINES[cfg.pipeline](cfg)
