"""The image pipeline (paper Algorithms 1 and 2) on sklearn's 8x8 digits, end to end on a CPU: pretrain an EDM score
model and a noise-aware classifier, generate fakes, train the DG head (with the guided-sampling callback), sample
with and without DG from the same seeds, and score both against the held-out digits in a digits classifier's
feature space (FID, precision / recall, KID, IS), with the training digits as the floor."""

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dg_lightning.callbacks import SamplingTask
from dg_lightning.data import ArraySource, load_digits_split
from dg_lightning.files import atomic_save
from dg_lightning.held_out import resolve_t_max, sampling_window
from dg_lightning.metrics import ClassifierFeatures, GenerativeMetrics, GreyAsRGB, inception_features
from dg_lightning.nets.adm import Discriminator
from dg_lightning.nets.edm import IndexLabels
from dg_lightning.pipelines.images import frozen, nfe_metrics, sample_images
from dg_lightning.pipelines.recipe import Pipeline, Stage, train_stage
from dg_lightning.plots import image_grid
from dg_lightning.pretrain import NoisyClassifierModule, ScoreModule, train_feature_classifier
from dg_lightning.sampling import build_sampler
from dg_lightning.seeds import stream_base_seed
from dg_lightning.shards import load_shards
from dg_lightning.training import build_network, pretrain, train_discriminator

DIGITS = ("data.source", "data.num_classes", "data.num_held_out", "data.split_seed")  # which digits, split how
SOURCE = ("data.source",)  # the file of the digits (null: sklearn's), fingerprinted by its content
LABELS = ("discriminator.conditional", "data.num_classes")  # whether samples carry class labels


def digits(cfg: DictConfig, split):
    """(uint8 NHWC images, int64 labels) of the "train" or "held_out" split of the configured digits."""
    d = cfg.data
    return load_digits_split(split, d.num_held_out, d.split_seed, d.source, d.num_classes)


def conditional_classes(cfg: DictConfig):
    """data.num_classes for a class-conditional run (discriminator.conditional), None for an unconditional one."""
    return cfg.data.num_classes if cfg.discriminator.conditional else None


def _with(node, **values):
    """A resolved copy of a config node with `values` set (keys it need not have)."""
    return OmegaConf.create({**OmegaConf.to_container(node, resolve=True), **values})


def check(cfg: DictConfig):
    """The digits source (data.source, or sklearn's digits) is read and checked before any compute."""
    digits(cfg, "train")


def pretrain_score(run):
    """The EDM denoiser (EMA weights) trained with the EDM loss on the training digits, with one-hot labels when the
    run is class-conditional; returned as IndexLabels (int64 class indices)."""
    cfg, s = run.cfg, run.cfg.score
    net, weights = _with(s.net, label_dim=conditional_classes(cfg) or 0), run.folder / "score_ema.pt"
    if not weights.exists():
        module = ScoreModule(build_network(cfg, net), instantiate(s.loss), lr=s.lr, warmup_steps=s.warmup_steps,
                             ema_halflife_images=s.ema_halflife_images)
        pretrain(cfg, module, ArraySource(*digits(cfg, "train")), s.batch_size, s.max_steps, module.ema_network(),
                 weights)
    return IndexLabels(frozen(instantiate(net), weights))


def pretrain_classifier(run):
    """The noise-aware EncoderUNet p(y | x_t, t) on LVP-diffused training digits."""
    cfg, c = run.cfg, run.cfg.discriminator.classifier
    weights = run.folder / "classifier.pt"
    if not weights.exists():
        module = NoisyClassifierModule(build_network(cfg, c.net), lr=c.lr, weight_decay=c.weight_decay,
                                       t_min=cfg.data.t_min)
        pretrain(cfg, module, ArraySource(*digits(cfg, "train")), c.batch_size, c.max_steps, module.classifier, weights)
    return frozen(instantiate(c.net), weights)


def generate_fakes(run):
    """data.num_fake + data.num_held_out fakes of the score model (no DG), drawn at the fakes' seed stream: the first
    data.num_fake for training, the rest held out of it."""
    cfg = run.cfg
    sample_images(cfg, run.results["pretrain_score"], run.folder, cfg.data.num_fake + cfg.data.num_held_out,
                  stream_base_seed(cfg.seed, "fakes"), num_classes=conditional_classes(cfg))
    return ArraySource(*load_shards(run.folder), name=f"fakes in {run.folder}")


def feature_net(run):
    """The metrics' feature extractor, never DG's own networks: the penultimate layer of a digits classifier trained on
    the clean training digits, or Inception-v3 from the local file metrics.inception_path."""
    cfg, m = run.cfg, run.cfg.metrics
    if m.features == "inception":
        inception = inception_features(m.inception_path)
        return GreyAsRGB(inception) if cfg.score.net.img_channels == 1 else inception
    weights = run.folder / "feature_net.pt"
    if not weights.exists():
        images, labels = digits(cfg, "train")
        atomic_save(train_feature_classifier(build_network(cfg, m.feature_net), images, labels, m.feature_steps)
                    .state_dict(), weights)
    return ClassifierFeatures(frozen(instantiate(m.feature_net), weights), head="fc")


def generative_metrics(cfg: DictConfig, features):
    """FID, precision/recall, KID and (with the digits classifier's class probabilities) IS; real features kept
    across resets."""
    m = cfg.metrics
    return GenerativeMetrics(features, reset_real_features=False, kid_subsets=m.kid.subsets,
                             kid_subset_size=m.kid.subset_size, kid_seed=cfg.seed,
                             inception_score=m.features == "digits_classifier")


def sampling_task(cfg: DictConfig, denoiser, features):
    """The guided-sampling callback's task: DG samples from the current discriminator, scored against the held-out
    digits (with guidance.dg.t_max=auto, which the trained head decides, over t_max = 1)."""
    cfg = sampling_window(cfg)
    return SamplingTask(
        lambda discriminator, latents, labels, noise: build_sampler(cfg, denoiser, discriminator)(latents, labels, noise),
        generative_metrics(cfg, features), (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution),
        real_images=torch.from_numpy(digits(cfg, "held_out")[0]).permute(0, 3, 1, 2),
        num_classes=conditional_classes(cfg), batch_size=cfg.metrics.batch_size)


def train_head(run, task):
    """The DG head on the frozen noise-aware classifier (pretrain_classifier), trained on the training and held-out
    digits (the held-out split: the latter) against the generate stage's fakes, with the guided-sampling callback bound
    to task() when `task` is given; returns the discriminator that discriminator.select picks (the last epoch's, or the
    callback's best)."""
    cfg = run.cfg
    head = build_network(cfg, _with(cfg.discriminator.head, num_classes=conditional_classes(cfg)), cfg.discriminator.seed)
    discriminator = Discriminator(run.results["pretrain_classifier"], head)
    real = ArraySource(*map(np.concatenate, zip(digits(cfg, "train"), digits(cfg, "held_out"))),
                       name="digits train and held-out splits")
    discriminator = train_discriminator(cfg, real, run.results["generate"], discriminator, run.loggers, run.folder,
                                        task, run.metrics)
    return discriminator.eval().requires_grad_(False)


def train(run):
    """The DG head against the score model's fakes (train_head), with the guided-sampling callback."""
    return train_head(run, lambda: sampling_task(run.cfg, run.results["pretrain_score"], run.results["feature_net"]))


SCORING = ("metrics.kid", "metrics.features")  # what the sampling callback's scores depend on, besides its inputs


def sample_unguided(run):
    """The baseline: metrics.num_samples samples without DG at the evaluation's seeds (shared by every DG setting)."""
    cfg, m = run.cfg, run.cfg.metrics
    return sample_images(cfg, run.results["pretrain_score"], run.folder, m.num_samples, m.sampling_seed,
                         num_classes=conditional_classes(cfg))


def sample(run):
    """DG samples from the same seeds as the baseline; FID / precision / recall / KID / IS of DG, no DG and the floor
    (training digits) against the held-out digits, the NFE per sample of DG and no DG, and digits_samples.png."""
    cfg, m = resolve_t_max(run.cfg, run.folders["train"], run.metrics), run.cfg.metrics
    train_images, folders = digits(cfg, "train")[0], {"eval": run.out_dir / "samples_dg",
                                                      "eval_unguided": run.folders["sample_unguided"]}
    samples = {
        "eval": sample_images(cfg, run.results["pretrain_score"], folders["eval"], m.num_samples,
                              m.sampling_seed, run.results["train"], num_classes=conditional_classes(cfg)),
        "eval_unguided": run.results["sample_unguided"],
        "eval_floor": train_images[np.random.default_rng(m.sampling_seed).permutation(len(train_images))[:m.num_samples]],
    }
    metrics = generative_metrics(cfg, run.results["feature_net"])
    metrics.feed(digits(cfg, "held_out")[0], True, m.batch_size)
    for prefix, images in samples.items():
        metrics.feed(images, False, m.batch_size)
        run.metrics.update({f"{prefix}/{name}": value for name, value in metrics.compute().items()
                            if prefix != "eval_floor" or name in ("fid", "kid", "is")})
        metrics.reset()
    run.metrics.update(nfe_metrics(folders))
    image_grid(samples, {name: run.metrics[f"{name}/fid"] for name in samples}, run.out_dir / "digits_samples.png",
               "8x8 digits: the first 64 of each set (FID to the held-out digits: lower is better)")


SCORE = ("seed", "score", *LABELS, *DIGITS)

PIPELINE = Pipeline("digits", check=check, stages=(
    Stage("pretrain_score", pretrain_score, keys=SCORE, files=SOURCE),
    Stage("pretrain_classifier", pretrain_classifier, keys=("seed", "discriminator.classifier", "data.t_min", *DIGITS),
          files=SOURCE),
    Stage("generate", generate_fakes, keys=("seed", "sampler", "data.num_fake", "data.num_held_out", *LABELS),
          inputs=("pretrain_score",)),
    Stage("feature_net", feature_net, keys=("seed", "metrics.features", "metrics.inception_path", "metrics.feature_net",
                                            "metrics.feature_steps", "score.net.img_channels", *DIGITS),
          files=(*SOURCE, "metrics.inception_path")),
    train_stage(train, ("seed", "sampler", "data", "discriminator"), SCORING, SOURCE,
                inputs=("pretrain_score", "pretrain_classifier", "generate", "feature_net")),
    Stage("sample_unguided", sample_unguided, keys=("sampler", "metrics.num_samples", "metrics.sampling_seed", *LABELS),
          inputs=("pretrain_score",)),
    Stage("sample", sample, keys=("seed", "sampler", "guidance", "metrics", *LABELS, *DIGITS), files=SOURCE,
          inputs=("pretrain_score", "train", "sample_unguided", "feature_net")),
))
