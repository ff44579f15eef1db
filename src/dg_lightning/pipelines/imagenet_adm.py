"""ADM-G++ on ImageNet 256 in pixel space (paper Table D.1): real images -> uint8 centre crops; ADM-G fakes (constant
classifier guidance) -> conditional DG head on the 256 classifier's 512x8x8 features -> ADM-G++ (CG + DG with Table
D.1's schedules) and ADM-G (the same CG, no DG) from the same seeds at equal steps -> ADM's evaluation
(pipelines.imagenet)."""

from functools import partial
from types import SimpleNamespace

import torch
from omegaconf import DictConfig, OmegaConf

from dg_lightning.accel import accelerate, build_accel
from dg_lightning.checkpoints import ADM_CLASSIFIERS, ADM_SOURCE_256, load_adm_classifier, load_adm_unet
from dg_lightning.config import ConfigError
from dg_lightning.evaluation import REFERENCE_ARRAYS, REFERENCE_SOURCE
from dg_lightning.guidance import ClassifierGuidance
from dg_lightning.nets.unet import adm256_cond
from dg_lightning.pipelines import imagenet
from dg_lightning.pipelines.images import device_of
from dg_lightning.pipelines.recipe import Pipeline, Stage
from dg_lightning.released import require_arrays, require_released
from dg_lightning.sampling import build_sampler
from dg_lightning.seeds import stream_base_seed

FAKE_KEYS = ("seed", "sampler.solver", "sampler.schedule", "sampler.clip_denoised", "data.num_classes",
             "data.image_size", "data.fake_cg_scale", "data.num_fake", "data.num_held_out")
CG_SCHEDULES = ("sampler.cg_scale", "sampler.cg_scale_late", "sampler.cg_switch_step", "sampler.eds")


def released_files(cfg: DictConfig):
    """{config key: where the file comes from} for every released file this ADM-G++ run reads."""
    files = {"score.checkpoint": ADM_SOURCE_256, "discriminator.classifier.path": ADM_SOURCE_256,
             "metrics.reference_batch": REFERENCE_SOURCE}
    if cfg.discriminator.head_path is not None:
        files["discriminator.head_path"] = ADM_CLASSIFIERS[cfg.discriminator.classifier.config].head_source
    return files


def image_sizes(cfg: DictConfig):
    """{config key: the image size of the network its file is loaded into}: the UNet and the classifier, built from
    score.overrides and discriminator.classifier on the meta device (their architectures alone: no file read, no
    weights allocated)."""
    c = cfg.discriminator.classifier
    with torch.device("meta"):
        unet = adm256_cond(**OmegaConf.to_container(cfg.score.overrides, resolve=True))
        classifier = ADM_CLASSIFIERS[c.config].build(**OmegaConf.to_container(c.overrides, resolve=True))
    return {"score.checkpoint": unet.image_size, "discriminator.classifier.path": classifier.image_size}


def check(cfg: DictConfig):
    """ConfigError before any compute for imagenet.check_common's problems, negative guidance scales, a non-positive
    DG boost, a UNet or classifier on another image size than data.image_size, a missing released file, or a reference
    batch without its arrays."""
    imagenet.check_common(cfg)
    s = cfg.sampler
    for key, value in (("sampler.cg_scale", s.cg_scale), ("sampler.cg_scale_late", s.cg_scale_late),
                       ("data.fake_cg_scale", cfg.data.fake_cg_scale)):
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}", "ADM-G++ uses 0.75 / 1.5, ADM-G 1.0; 0 switches CG off")
    if cfg.guidance.dg.boost <= 0:
        raise ConfigError("guidance.dg.boost", f"must be > 0, got {cfg.guidance.dg.boost}", "1 is no boost; the paper's "
                          "ADM-G++ uses 1 / 0.75 = 1.3333")
    for key, size in image_sizes(cfg).items():
        if size != cfg.data.image_size:
            raise ConfigError(key, f"{OmegaConf.select(cfg, key)} is loaded into a network on {size}x{size} images but "
                              f"data.image_size is {cfg.data.image_size}", "use the 256x256 files with "
                              "data.image_size=256")
    require_released(cfg, released_files(cfg))
    require_arrays(cfg, "metrics.reference_batch", REFERENCE_ARRAYS, REFERENCE_SOURCE)


def adm_sample_fn(cfg: DictConfig, model, classifier, discriminator=None, fake_cg_scale=None):
    """generate's sample_fn(latents, labels, noise): cfg.sampler on ADM's UNet in pixel space with classifier guidance
    by the 256 classifier (fed timesteps 999 tau) and the sampler's CG schedules, with DG (guidance.dg) when a
    discriminator is given; with fake_cg_scale, plain ADM-G at that constant scale (the fakes). Images in [-1, 1]."""
    run_classifier = accelerate(classifier, build_accel(cfg.accel))
    cg = ClassifierGuidance(lambda x, tau: run_classifier(x, 999.0 * tau))
    constant = ({} if fake_cg_scale is None else
                {"cg_scale": fake_cg_scale, "cg_scale_late": fake_cg_scale, "cg_switch_step": 0, "eds": False})
    sample = build_sampler(cfg, model, discriminator, classifier=cg, **constant)

    def sample_fn(latents, class_labels, noise):
        with torch.no_grad():  # guidance enables the input gradient itself
            return sample(latents, class_labels, noise)

    sample_fn.nfe = sample.nfe  # each batch's NFE, which generate stores in the shards
    return sample_fn


def load(run):
    """ADM's UNet and the 256 classifier (classifier guidance) from their released state dicts, on the run's device;
    sample_fn(cfg, discriminator=) gives ADM-G (++) images."""
    cfg, c = run.cfg, run.cfg.discriminator.classifier
    model = load_adm_unet(cfg.score.checkpoint, **OmegaConf.to_container(cfg.score.overrides, resolve=True))
    classifier = load_adm_classifier(c.path, c.config, **OmegaConf.to_container(c.overrides, resolve=True))
    model, classifier = model.to(device_of(cfg)), classifier.to(device_of(cfg)).eval().requires_grad_(False)
    size = cfg.data.image_size
    return SimpleNamespace(model=model, classifier=classifier, shape=(3, size, size),
                           sample_fn=partial(adm_sample_fn, model=model, classifier=classifier))


def encode(run):
    """The ImageNet train folder's uint8 centre crops."""
    return imagenet.encode_real(run.cfg, None, run.folder)


def generate_fakes(run):
    """data.num_fake + data.num_held_out ADM-G fakes (constant CG scale data.fake_cg_scale) as uint8 images, at the
    fakes' seed stream: the last data.num_held_out held out of training."""
    cfg, loaded, d = run.cfg, run.results["load"], run.cfg.data
    sample_fn = adm_sample_fn(cfg, loaded.model, loaded.classifier, fake_cg_scale=d.fake_cg_scale)
    imagenet.sample_to(cfg, sample_fn, run.folder, d.num_fake + d.num_held_out, stream_base_seed(cfg.seed, "fakes"),
                       FAKE_KEYS, loaded.shape, True)


PIPELINE = Pipeline("imagenet_adm", check=check, stages=(
    Stage("load", load, keys=("score", "discriminator.classifier", "data.image_size"),
          files=("score.checkpoint", "discriminator.classifier.path")),
    Stage("encode", encode, keys=imagenet.ENCODE_KEYS, files=imagenet.ENCODE_FILES, when=imagenet.trains),
    Stage("generate", generate_fakes, keys=FAKE_KEYS, uses=CG_SCHEDULES, inputs=("load",), when=imagenet.trains),
    imagenet.imagenet_train_stage("encode", "generate"),
    Stage("sample_unguided", imagenet.sample_unguided, keys=imagenet.SAMPLE_KEYS,
          inputs=("load",)),
    Stage("sample", imagenet.sample, keys=(*imagenet.SAMPLE_KEYS, "guidance"), inputs=("load", "train")),
    Stage("evaluate", imagenet.evaluate_samples, keys=("metrics",), files=imagenet.EVALUATE_FILES,
          inputs=("sample", "sample_unguided")),
))
