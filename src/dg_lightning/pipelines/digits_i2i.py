"""Image-to-image translation with DG (paper Appendix C) on sklearn's digits, end to end on a CPU: SDEdit from a source
domain of coarse digits (a low-resolution, posterised, blurred thumbnail of each digit: coarse_strokes) into the
target domain of crisp digits, by the digits' EDM score model; DG's discriminator is trained with the target digits as
real and translated sources as fake, and guides the translation.

A source x_s is diffused to the starting time t0 (EDM coordinates: x = x_s + sigma(t0) z) and denoised by the target
score model's PF-ODE from sigma(t0) to 0, with or without DG. A larger t0 forgets more of the source: more realistic
(lower FID against the target digits), less faithful (further from the source in the digits classifier's feature
space, and less often the source's digit). The claim tested: DG reaches a given FID at a smaller t0.
"""

import math

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from omegaconf import DictConfig
from torch.nn import functional as F

from dg_lightning.config import ConfigError
from dg_lightning.data import ArraySource
from dg_lightning.files import atomic_save, load_weights
from dg_lightning.pipelines import digits
from dg_lightning.pipelines.recipe import TRAINING_LENGTH, Pipeline, Stage
from dg_lightning.plots import save
from dg_lightning.progress import track
from dg_lightning.sampling import build_sampler
from dg_lightning.sde import LinearVP
from dg_lightning.seeds import SampleNoise, sample_seed, stream_base_seed
from dg_lightning.shards import to_uint8

TRANSLATION = ("translation.source", "translation.t0_train", "translation.t0")


def coarse_strokes(images, pool, levels, blur):
    """The source domain: uint8 NHWC images averaged over pool x pool blocks (a pool times coarser thumbnail),
    posterised to `levels` grey levels, enlarged back by repeating each block and blurred by a Gaussian of standard
    deviation `blur` pixels (reflected at the edges); uint8 NHWC."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    x = torch.round(F.avg_pool2d(x, pool) * (levels - 1)) / (levels - 1)
    x = x.repeat_interleave(pool, dim=2).repeat_interleave(pool, dim=3)
    if blur > 0:
        radius = math.ceil(3 * blur)
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / blur) ** 2)
        taps = (taps / taps.sum()).to(x)
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1).expand(x.shape[1], 1, 1, -1),
                     groups=x.shape[1])
        x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), taps.view(1, 1, -1, 1).expand(x.shape[1], 1, -1, 1),
                     groups=x.shape[1])
    return torch.round(x * 255.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def sources(cfg: DictConfig, split):
    """(uint8 NHWC source images, the digits' labels) of the "train" or "held_out" split: coarse_strokes of its digits."""
    images, labels = digits.digits(cfg, split)
    s = cfg.translation.source
    return coarse_strokes(images, s.pool, s.levels, s.blur), labels


def sdedit(cfg: DictConfig, score_model, x_s, t0, base_seed, discriminator=None):
    """SDEdit in the score model's EDM coordinates: sources x_s (B, ...) diffused to VP time t0, x = x_s + sigma(t0) z
    with z from sample i's seed (base_seed, i), then cfg.sampler's PF-ODE from sigma(t0) down in ceil(num_steps t0)
    steps (at least 2), with DG when a discriminator is given; the translations (B, ...)."""
    sigma0 = float(LinearVP().edm_sigma_from_tau(torch.tensor(t0, dtype=torch.float64)))
    sample = build_sampler(cfg, score_model, discriminator, sigma_max=sigma0,
                           num_steps=max(2, math.ceil(cfg.sampler.num_steps * t0)))
    batch_size, out = cfg.metrics.batch_size, []
    for start in track(range(0, len(x_s), batch_size), f"translate at t0={t0:g}{' with DG' if discriminator else ''}"):
        batch = range(start, min(start + batch_size, len(x_s)))
        noise, chunk = SampleNoise([sample_seed(base_seed, i) for i in batch], x_s.device), x_s[start:batch.stop]
        with torch.no_grad():  # guidance enables its input gradient itself
            out.append(sample(chunk / sigma0 + noise.randn(chunk.shape), None, noise))
    return torch.cat(out)


def translate(cfg: DictConfig, denoiser, images, t0, base_seed, discriminator=None):
    """uint8 NHWC source images translated by sdedit (as [-1, 1] images, on the denoiser's device); uint8 NHWC."""
    x_s = torch.from_numpy(images).to(next(denoiser.parameters()).device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return to_uint8(sdedit(cfg, denoiser, x_s, t0, base_seed, discriminator)).permute(0, 2, 3, 1).cpu().numpy()


def generate_fakes(run):
    """The discriminator's fakes: the sources of the training and held-out digits translated without DG at
    translation.t0_train, in that order (the held-out digits' translations are its held-out fakes)."""
    cfg, weights = run.cfg, run.folder / "fakes.pt"
    if not weights.exists():
        images = np.concatenate([sources(cfg, "train")[0], sources(cfg, "held_out")[0]])
        fakes = translate(cfg, run.results["pretrain_score"], images, cfg.translation.t0_train,
                          stream_base_seed(cfg.seed, "fakes"))
        atomic_save(torch.from_numpy(fakes), weights)
    return ArraySource(load_weights(weights).numpy(), name=f"translated sources in {run.folder}")


def train(run):
    """The DG head, trained with the target digits (training and held-out splits) as real and the translated sources
    as fake (digits.train_head)."""
    return digits.train_head(run, None)


def translations(run, discriminator=None):
    """{t0: uint8 NHWC translations of the held-out sources} for every t0 of translation.t0 (with DG when a
    discriminator is given), each kept in the stage folder."""
    cfg, found, images = run.cfg, {}, None
    for t0 in cfg.translation.t0:
        path = run.folder / f"t0={t0:g}.pt"
        if not path.exists():
            images = sources(cfg, "held_out")[0] if images is None else images
            atomic_save(torch.from_numpy(translate(cfg, run.results["pretrain_score"], images, t0,
                                                   cfg.metrics.sampling_seed, discriminator)), path)
        found[t0] = load_weights(path).numpy()
    return found


def translate_unguided(run):
    """The baseline: the held-out sources translated without DG at every t0 (shared by every DG setting)."""
    return translations(run)


def faithfulness(features, translated, images, labels, batch_size):
    """{feature_l2: mean L2 distance between each translation's and its source's features, label_agreement: the
    fraction of translations that the digits classifier reads as the source's digit}."""
    distances, agreements = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            pair = [torch.from_numpy(a[start:start + batch_size]).permute(0, 3, 1, 2) for a in (translated, images)]
            f_translated, f_source = (features(x) for x in pair)
            distances.append((f_translated - f_source).double().norm(dim=1))
            predicted = features.class_logits(f_translated).argmax(dim=1)
            agreements.append((predicted == torch.from_numpy(labels[start:start + batch_size])).double())
    return {"feature_l2": torch.cat(distances).mean().item(), "label_agreement": torch.cat(agreements).mean().item()}


def translate_and_evaluate(run):
    """The held-out sources translated with DG at every t0; for each t0 and set (eval: DG, eval_unguided: no DG) FID,
    precision, recall, KID and IS against the held-out target digits and the faithfulness to the source, as
    <set>/<metric>@t0=<t0>, and how often the digits classifier reads the sources themselves as their digit
    (sources/label_agreement); i2i.png draws them against t0."""
    cfg, m = run.cfg, run.cfg.metrics
    sets = {"eval": translations(run, run.results["train"]), "eval_unguided": run.results["translate_unguided"]}
    images, labels = sources(cfg, "held_out")
    features = run.results["feature_net"]
    metrics = digits.generative_metrics(cfg, features)
    metrics.feed(digits.digits(cfg, "held_out")[0], True, m.batch_size)
    run.metrics["sources/label_agreement"] = faithfulness(features, images, images, labels, m.batch_size)["label_agreement"]
    for prefix, by_t0 in sets.items():
        for t0, translated in by_t0.items():
            metrics.feed(translated, False, m.batch_size)
            scores = {**metrics.compute(), **faithfulness(features, translated, images, labels, m.batch_size)}
            metrics.reset()
            run.metrics.update({f"{prefix}/{name}@t0={t0:g}": value for name, value in scores.items()})
    save(sweet_spot_figure(run.metrics, cfg.translation.t0), run.out_dir / "i2i.png")


SET_NAMES = {"eval_unguided": "SDEdit (no DG)", "eval": "SDEdit + DG"}


def sweet_spot_figure(metrics, grid):
    """FID to the target digits, feature distance to the source and label agreement with the source against t0, one
    line per set (the paper's figure of the sweet spot over the starting time)."""
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    panels = (("fid", "FID to the held-out target digits\n(lower: more realistic)"),
              ("feature_l2", "feature distance to the source\n(lower: more faithful)"),
              ("label_agreement", "translations read as the source's digit\n(higher: more faithful)"))
    for ax, (name, label) in zip(fig.subplots(1, 3), panels):
        for prefix, words in SET_NAMES.items():
            ax.plot(grid, [metrics[f"{prefix}/{name}@t0={t0:g}"] for t0 in grid], marker="o", label=words)
        if name == "label_agreement":
            ax.axhline(metrics["sources/label_agreement"], color="grey", linestyle="--", label="the sources themselves")
            ax.axhline(0.1, color="grey", linestyle=":", label="chance (10 digits)")
        if name == "fid":
            ax.set_yscale("log")
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_xlabel("starting time t0 (VP time; larger forgets more)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("Digits image-to-image translation (coarse thumbnails to digits): realism against faithfulness over t0")
    return fig


DIGITS_STAGES = {stage.name: stage for stage in digits.PIPELINE.stages}  # the networks it shares with digits_edm_g++
SOURCE = digits.SOURCE


def check(cfg: DictConfig):
    """Before any compute: the digits source is read and checked (digits.check), the metrics' features are the digits
    classifier's (the label agreement reads its class logits), the head is the last epoch's (no sampling callback
    here) and every starting time lies in (0, 1]."""
    digits.check(cfg)
    if cfg.metrics.features != "digits_classifier":
        raise ConfigError("metrics.features", f"is {cfg.metrics.features!r}, but the translations' label agreement "
                          "reads the digits classifier's class logits", "use metrics.features=digits_classifier")
    if cfg.discriminator.select != "last":
        raise ConfigError("discriminator.select", f"is {cfg.discriminator.select!r}, but the translation's head trains "
                          "without the guided-sampling callback (its samples are translations of given sources)",
                          "use discriminator.select=last")
    if not all(0 < t0 <= 1 for t0 in (cfg.translation.t0_train, *cfg.translation.t0)):
        raise ConfigError("translation.t0", f"starting times must lie in (0, 1] (VP time), got t0_train="
                          f"{cfg.translation.t0_train}, t0={list(cfg.translation.t0)}", "e.g. translation.t0=[0.2,0.4,0.6]")


PIPELINE = Pipeline("digits_i2i", check=check, stages=(
    DIGITS_STAGES["pretrain_score"],
    DIGITS_STAGES["pretrain_classifier"],
    Stage("generate", generate_fakes, keys=("seed", "sampler", "translation.source", "translation.t0_train",
                                            *digits.DIGITS), files=SOURCE, inputs=("pretrain_score",)),
    DIGITS_STAGES["feature_net"],
    Stage("train", train, keys=("seed", "data", "discriminator", *TRAINING_LENGTH), files=SOURCE,
          inputs=("pretrain_classifier", "generate")),
    Stage("translate_unguided", translate_unguided, keys=("seed", "sampler", "translation.source", "translation.t0",
                                                          "metrics.sampling_seed", *digits.DIGITS),
          files=SOURCE, inputs=("pretrain_score",)),
    Stage("translate", translate_and_evaluate, keys=("seed", "sampler", "guidance", "metrics", *TRANSLATION,
                                                     *digits.DIGITS), files=SOURCE,
          inputs=("pretrain_score", "train", "translate_unguided", "feature_net")),
))
