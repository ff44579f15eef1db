"""G++ on a released pixel-space score network: EDM-G++ on an EDM network pickle (paper Tables 2 and 3) and Soft
Truncation-G++ on its CelebA 64 checkpoint (Table 3): fakes -> DG head on a released ADM classifier -> samples with and
without DG from the same seeds at equal NFE -> FID against the reference statistics (+ precision / recall against the
real data when data.path is given). score.format names the network's file format (SCORE_FORMATS)."""

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dg_lightning.callbacks import SamplingTask
from dg_lightning.checkpoints import (
    ADM_CLASSIFIERS,
    EDM_SOURCE,
    SOFT_TRUNCATION_SOURCE,
    load_edm,
    load_soft_truncation,
)
from dg_lightning.config import ConfigError, require_count, require_held_out
from dg_lightning.held_out import resolve_t_max, sampling_window
from dg_lightning.metrics import FID_REFERENCE_ARRAYS, GenerativeMetrics, inception_features
from dg_lightning.nets.edm import IndexLabels
from dg_lightning.pipelines.images import device_of, image_sampler, nfe_metrics, sample_images
from dg_lightning.pipelines.recipe import Pipeline, Stage, train_stage
from dg_lightning.released import (
    DISCRIMINATOR_FILES,
    FID_REFS_SOURCE,
    check_discriminator_config,
    dg_discriminator,
    require_arrays,
    require_released,
)
from dg_lightning.seeds import stream_base_seed
from dg_lightning.sources import load_source
from dg_lightning.training import train_discriminator


@dataclass(frozen=True)
class ScoreFormat:
    """A released score network's file format: load(cfg.score) -> the network on the CPU (with img_channels,
    img_resolution, label_dim), the kind of score model it is (solvers.SCORE_KINDS) and where the file comes from."""

    load: Callable
    kind: str
    source: str


def _overrides(score: DictConfig):
    """score.overrides as keyword arguments: architecture changes, only for tiny test networks."""
    return OmegaConf.to_container(score.overrides, resolve=True)


SCORE_FORMATS = {
    "edm_pickle": ScoreFormat(lambda score: IndexLabels(load_edm(score.checkpoint)), "denoiser", EDM_SOURCE),
    "soft_truncation": ScoreFormat(lambda score: load_soft_truncation(score.checkpoint, score.weights,
                                                                      **_overrides(score)),
                                   "vp_score", SOFT_TRUNCATION_SOURCE),
}


def released_files(cfg: DictConfig):
    """{config key: where the released file comes from} for every released file this run reads."""
    spec = ADM_CLASSIFIERS[cfg.discriminator.classifier.config]
    files = {"score.checkpoint": SCORE_FORMATS[cfg.score.format].source, "discriminator.classifier.path": spec.source,
             "metrics.fid_reference": FID_REFS_SOURCE}
    if cfg.discriminator.head_path is not None:
        files["discriminator.head_path"] = spec.head_source
    return files


def check(cfg: DictConfig):
    """ConfigError before any compute for an unknown score.format or one of another kind than score.kind,
    check_discriminator_config's problems, no real data to train on (none left after data.num_held_out), a missing
    released file (naming the key, the file and where to get it), or FID reference statistics without their arrays."""
    if cfg.score.format not in SCORE_FORMATS:
        raise ConfigError("score.format", f"unknown format {cfg.score.format!r}", f"use one of {sorted(SCORE_FORMATS)}")
    if SCORE_FORMATS[cfg.score.format].kind != cfg.score.kind:
        raise ConfigError("score.kind", f"is {cfg.score.kind!r} but a {cfg.score.format!r} network is a "
                          f"{SCORE_FORMATS[cfg.score.format].kind!r} model", "use the score config of the format")
    check_discriminator_config(cfg, "discriminator_60.pt")
    if trains(cfg) and cfg.data.path is None:
        raise ConfigError("data.path", "is null but training the discriminator needs real images",
                          "set data.path to true_data.npz, EDM's dataset zip or an image folder, or guide with a released "
                          "head as it is (discriminator.head_path=... trainer.max_epochs=0)")
    if trains(cfg) and cfg.data.num_real is not None:
        require_held_out(cfg.data.num_held_out, cfg.data.num_real, cfg.data.path)
    require_released(cfg, released_files(cfg))
    require_arrays(cfg, "metrics.fid_reference", FID_REFERENCE_ARRAYS, FID_REFS_SOURCE)


def trains(cfg: DictConfig):
    """Whether the run trains the head (else it guides with the released head as it is, and makes no fakes)."""
    return cfg.trainer.max_epochs != 0


def classifier_resolution(cfg: DictConfig):
    """The image size discriminator.classifier takes, from its architecture alone (no file read, no weights)."""
    c = cfg.discriminator.classifier
    with torch.device("meta"):
        return ADM_CLASSIFIERS[c.config].build(**OmegaConf.to_container(c.overrides, resolve=True)).image_size


def load(run):
    """The released score network of score.format (int64 labels in, on the run's device), its number of classes, and
    the real images of data.path (None without it; each centre-cropped and resized with data.crop), checked against the
    network (and the classifier's image size against its own)."""
    cfg, d = run.cfg, run.cfg.discriminator
    score_model = SCORE_FORMATS[cfg.score.format].load(cfg.score).to(device_of(cfg))
    num_classes = score_model.label_dim or None
    if d.conditional != (num_classes is not None):
        raise ConfigError("discriminator.conditional", f"is {d.conditional} but the score network {cfg.score.checkpoint} "
                          f"has label_dim={score_model.label_dim}", "use cifar10_cond_edm_g++ for a conditional network")
    c, size = cfg.discriminator.classifier, classifier_resolution(cfg)
    if size != score_model.img_resolution:
        raise ConfigError("discriminator.classifier.config", f"the {c.config!r} classifier takes {size}x{size} images "
                          f"but the score network makes {score_model.img_resolution}x{score_model.img_resolution}",
                          "use cifar10 for 32x32, adm64 for 64x64")
    real = None if cfg.data.path is None else load_source(
        cfg.data.path, "data.path", score_model.img_resolution, score_model.img_channels, d.conditional, cfg.data.num_real,
        cfg.data.crop)
    if real is not None:  # load_source keeps at most data.num_real: fewer means the data holds fewer
        require_count("data.num_real", cfg.data.num_real, len(real), cfg.data.path)
        require_held_out(cfg.data.num_held_out, len(real), cfg.data.path)
    if real is not None and num_classes and real.labels.max() >= num_classes:
        raise ConfigError("data.path", f"{cfg.data.path} has labels up to {real.labels.max().item()} but the score "
                          f"network has {num_classes} classes", "use the real data of the score network's data set")
    return SimpleNamespace(score_model=score_model, num_classes=num_classes, real=real, decoder=None)


def generate_fakes(run):
    """data.num_fake + data.num_held_out fakes of the score network (no DG), at the fakes' seed stream: the first
    data.num_fake for training, the rest held out of it."""
    cfg, loaded = run.cfg, run.results["load"]
    sample_images(cfg, loaded.score_model, run.folder, cfg.data.num_fake + cfg.data.num_held_out,
                  stream_base_seed(cfg.seed, "fakes"),
                  num_classes=loaded.num_classes)


def features_of(cfg: DictConfig):
    """The metrics' feature network: the FID Inception-v3 from metrics.inception_path, or metrics.feature_net."""
    m = cfg.metrics
    return inception_features(m.inception_path) if m.features == "inception" else instantiate(m.feature_net)


def real_reference(real, num_images, seed):
    """num_images real uint8 NHWC images of the run's real data (a random subset, drawn from seed) for precision /
    recall; None without real data."""
    return None if real is None else real.samples[np.random.default_rng(seed).permutation(len(real))[:num_images]]


def edm_metrics(cfg: DictConfig, real):
    """FID against metrics.fid_reference, plus precision / recall against real images when real data is given; on the
    run's device."""
    return GenerativeMetrics(features_of(cfg), fid_reference=cfg.metrics.fid_reference, precision_recall=real is not None,
                             reset_real_features=False).to(device_of(cfg))


def sampling_task(cfg: DictConfig, loaded):
    """The guided-sampling callback's task: DG samples of the score network from the current discriminator (decoded
    by loaded.decoder for a latent score model), scored as the sample stage scores (FID against metrics.fid_reference;
    precision / recall against as many real images)."""
    c, window = cfg.callbacks.sampling, sampling_window(cfg)
    real = real_reference(loaded.real, c.num_samples, c.seed)
    return SamplingTask(lambda discriminator, latents, labels, noise: image_sampler(window, loaded.score_model, discriminator,
                                                                                    loaded.decoder)(latents, labels, noise),
                        edm_metrics(cfg, real), (loaded.score_model.img_channels, loaded.score_model.img_resolution,
                                                 loaded.score_model.img_resolution),
                        real_images=None if real is None else torch.from_numpy(real).permute(0, 3, 1, 2),
                        num_classes=loaded.num_classes, batch_size=cfg.metrics.batch_size)


def train(run):
    """DG's discriminator on the released classifier: the released head as it is (trainer.max_epochs=0), or a head
    trained on the real images against the fakes (the last data.num_held_out of each held out) with the guided-sampling
    callback, the epoch that discriminator.select picks; frozen, on the run's device."""
    cfg, loaded = run.cfg, run.results["load"]
    discriminator = dg_discriminator(cfg)
    if trains(cfg):
        folder = run.folders["generate"]
        fake = load_source(folder, f"fakes in {folder}", labels=cfg.discriminator.conditional)
        discriminator = train_discriminator(cfg, loaded.real, fake, discriminator, run.loggers, run.folder,
                                            lambda: sampling_task(cfg, loaded), run.metrics)
    return discriminator.to(device_of(cfg)).eval().requires_grad_(False)


def sample_unguided(run):
    """The baseline: metrics.num_samples samples without DG at the evaluation's seeds (shared by every DG setting)."""
    cfg, loaded, m = run.cfg, run.results["load"], run.cfg.metrics
    return sample_images(cfg, loaded.score_model, run.folder, m.num_samples, m.sampling_seed, num_classes=loaded.num_classes,
                         decoder=loaded.decoder)


def sample(run):
    """DG samples from the same seeds as the baseline; {fid} of both against metrics.fid_reference, plus {precision,
    recall} against as many real images when data.path is given, and {nfe} (the mean per sample) when the sample
    folders store it."""
    cfg, loaded, m = resolve_t_max(run.cfg, run.folders["train"], run.metrics), run.results["load"], run.cfg.metrics
    folders = {"eval": run.out_dir / "samples_dg", "eval_unguided": run.folders["sample_unguided"]}
    samples = {
        "eval": sample_images(cfg, loaded.score_model, folders["eval"], m.num_samples, m.sampling_seed,
                              run.results["train"], loaded.num_classes, loaded.decoder),
        "eval_unguided": run.results["sample_unguided"],
    }
    reference = real_reference(loaded.real, m.num_samples, m.sampling_seed)
    metrics = edm_metrics(cfg, reference)
    if reference is not None:
        metrics.feed(reference, True, m.batch_size)
    for prefix, images in samples.items():
        metrics.feed(images, False, m.batch_size)
        run.metrics.update({f"{prefix}/{name}": value for name, value in metrics.compute().items()})
        metrics.reset()
    run.metrics.update(nfe_metrics(folders))


SCORING_FILES = ("metrics.fid_reference", "metrics.inception_path")
SCORING = ("sampler", "metrics.features", "metrics.feature_net", *SCORING_FILES)  # what the sampling callback's scores
                                                                                  # depend on, besides the head

# The last two stages, shared with the latent pipeline (pipelines.lsgm): samples without and with DG, and their scores.
SAMPLE_UNGUIDED = Stage("sample_unguided", sample_unguided, keys=("sampler", "metrics.num_samples", "metrics.sampling_seed"),
                        inputs=("load",))
SAMPLE = Stage("sample", sample, keys=("sampler", "guidance", "metrics"), files=SCORING_FILES,
               inputs=("load", "train", "sample_unguided"))

PIPELINE = Pipeline("edm", check=check, stages=(
    Stage("load", load, keys=("score", "data.path", "data.crop", "data.num_real", "discriminator.conditional"),
          uses=("discriminator.classifier.config", "discriminator.classifier.overrides", "data.num_held_out"),
          files=("score.checkpoint", "data.path")),
    Stage("generate", generate_fakes, keys=("seed", "sampler", "data.num_fake", "data.num_held_out"), inputs=("load",),
          when=trains),
    train_stage(train, ("seed", "data", "discriminator"), SCORING, DISCRIMINATOR_FILES, SCORING_FILES,
                inputs=("load", "generate")),
    SAMPLE_UNGUIDED,
    SAMPLE,
))
