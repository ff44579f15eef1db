"""The ImageNet 256 pipelines: DiT-XL/2-G++ (pipeline=imagenet, paper Table 4) and ADM-G++ (pipeline=imagenet_adm,
paper Table D.1).

Both run the stages
- encode: the ImageNet train folder into labelled shards (SD-VAE latents for DiT; ADM's uint8 centre crops for ADM);
- generate: fakes from the score model (DiT latents with constant CFG; ADM-G images with constant classifier guidance);
- train: DG's conditional head on a frozen ADM classifier's features, real and fake read memory-mapped
  (sources.shard_source); for DiT without DG_imagenet's latent classifier, that classifier is trained first;
- sample: the G++ sampler and its baseline (DG off) from the same seeds and labels at equal steps, as uint8 images;
- evaluate: FID, sFID, IS, precision, recall against ADM's reference batch, and evaluator npz exports.
Each stage is cached by the config keys that determine it (stages.stage_dir) and resumable (sharded, per-sample seeds).
"""

import copy
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dg_lightning.accel import accelerate
from dg_lightning.checkpoints import (
    ADM_CLASSIFIERS,
    ADM_SOURCE_256,
    DG_IMAGENET_SOURCE,
    DIT_SOURCE,
    load_adm_unet,
    load_dit,
)
from dg_lightning.config import ConfigError
from dg_lightning.ddpm import DDPMSchedule, ddpm_sampler
from dg_lightning.evaluation import (
    REFERENCE_SOURCE,
    ADMInception,
    evaluate,
    export_samples,
    load_reference_batch,
)
from dg_lightning.generate import generate, load_shards, stream_base_seed
from dg_lightning.guidance import ClassifierGuidance
from dg_lightning.latents import (
    VAE_SOURCE,
    LatentAutoencoder,
    encode_image_folder,
    round_trip,
)
from dg_lightning.loggers import build_loggers, finish_loggers
from dg_lightning.nets.unet import adm256_cond
from dg_lightning.pipeline import check_discriminator_config, edm_discriminator, require_released
from dg_lightning.pretrain import NoisyClassifierModule
from dg_lightning.sources import IMAGE_SUFFIXES, shard_source
from dg_lightning.stages import (
    build_accel,
    build_network,
    dg_guidance,
    fingerprint,
    pretrain,
    stage_dir,
    train_discriminator,
    write_metrics,
)

IMAGENET_STAGES = ("encode", "generate", "train", "sample", "evaluate")
ENCODE_KEYS = ["seed", "data.image_dir", "data.image_size", "data.flip", "data.vae", "data.num_real"]
FAKE_KEYS = ["seed", "score", "sampler.num_timesteps", "sampler.respacing", "sampler.guided_channels",
             "sampler.clip_denoised", "data.fake_cfg_scale", "data.num_fake", "data.fake_round_trip",
             "data.fake_jpeg_quality", "data.vae"]
ADM_FAKE_KEYS = ["seed", "score", "discriminator.classifier", "sampler.num_timesteps", "sampler.respacing",
                 "sampler.clip_denoised", "data.fake_cg_scale", "data.num_fake"]
SAMPLE_KEYS = ["score", "sampler", "data.image_size", "metrics.num_samples", "metrics.sampling_seed"]
ADM_SAMPLE_KEYS = [*SAMPLE_KEYS, "discriminator.classifier"]  # ADM's baseline is guided by the classifier
CLASSIFIER_KEYS = ["seed", "data.t_min", *ENCODE_KEYS, *(f"discriminator.classifier.{k}" for k in
                                                         ("config", "overrides", "batch_size", "max_steps", "lr", "weight_decay"))]


def train_keys(fake_keys):
    """The config keys that determine the trained discriminator of a run whose fakes depend on fake_keys."""
    return [*fake_keys, *ENCODE_KEYS, "data", "discriminator", "trainer.max_epochs", "trainer.max_steps"]


def _device(cfg: DictConfig):
    """The device the networks run on: the GPU for trainer.accelerator gpu / cuda, else the CPU."""
    return torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")


def _stop(cfg: DictConfig):
    """The index in IMAGENET_STAGES of the last stage to run (cfg.stage)."""
    return IMAGENET_STAGES.index(cfg.stage) if cfg.stage != "all" else len(IMAGENET_STAGES) - 1


def _trains_classifier(cfg: DictConfig):
    """Whether this run trains the latent classifier: no file at discriminator.classifier.path, train_if_missing."""
    c = cfg.discriminator.classifier
    return bool(c.get("train_if_missing", False)) and not Path(c.path).exists()


def check_common(cfg: DictConfig):
    """ConfigError before any compute for check_discriminator_config's problems, a bad DDPM schedule, or no (or an
    empty) image folder to train on (both ImageNet pipelines)."""
    check_discriminator_config(cfg, "discriminator_7.pt")
    try:
        DDPMSchedule(cfg.sampler.num_timesteps, str(cfg.sampler.respacing))
    except ValueError as exc:
        raise ConfigError("sampler.respacing", str(exc), "use e.g. 250 of num_timesteps=1000") from exc
    if cfg.trainer.max_epochs != 0:
        image_dir = cfg.data.image_dir
        if image_dir is None or not Path(image_dir).is_dir() or not any(
                f.suffix.lower() in IMAGE_SUFFIXES for c in Path(image_dir).iterdir() if c.is_dir() for f in c.iterdir()):
            raise ConfigError("data.image_dir", f"{image_dir} is not a folder of class subfolders with images, but "
                              "training the discriminator needs real images", "point it at ImageNet's train folder "
                              "(<wnid>/<image>.JPEG), or guide with a released head as it is (trainer.max_epochs=0)")


def evaluate_folders(cfg: DictConfig, folders, out_dir, device):
    """Stage evaluate: {"<set>/<metric>"} of each named folder of uint8 sample shards against ADM's reference batch
    (metrics.features: Inception, or a stand-in feature_net), and the sets exported as <out_dir>/<set>_samples.npz."""
    m = cfg.metrics
    features = ADMInception(m.inception_path) if m.features == "inception" else instantiate(m.feature_net)
    reference = load_reference_batch(m.reference_batch, features.num_features, features.num_spatial)
    metrics = {}
    for prefix, folder in folders.items():
        images, labels = load_shards(folder)
        metrics.update({f"{prefix}/{k}": v for k, v in evaluate(features, images, reference, m.batch_size, device,
                                                               m.k).items()})
        if m.export:
            export_samples(Path(out_dir) / f"{prefix}_samples.npz", images, labels)
    return metrics


def sample_to(cfg: DictConfig, sample_fn, folder, num_samples, base_seed, keys, shape, images, device):
    """Sharded, resumable samples of generate's sample_fn from N(0, I) of `shape`, labels drawn per sample index:
    uint8 images of data.image_size when `images`, else float32 arrays of `shape` (latents); returns the folder."""
    size = cfg.data.image_size
    generate(sample_fn, folder, num_samples, shape, base_seed=base_seed, batch_size=cfg.metrics.sample_batch_size,
             num_classes=cfg.data.num_classes, out_shape=(3, size, size) if images else None,
             dtype="uint8" if images else "float32", fingerprint=fingerprint(cfg, keys), device=device)
    return folder


def sample_and_evaluate(cfg: DictConfig, build_sample_fn, discriminator, sample_keys, fake_keys, train_inputs, shape,
                        stop, loggers, device):
    """Stages sample (stop >= 3) and evaluate (stop >= 4) of both ImageNet pipelines: uint8 samples of generate's
    sample_fn build_sample_fn(discriminator) (G++, DG on) and build_sample_fn(None) (the baseline, DG off) from the
    same seeds and labels, each built right before it samples; then evaluate_folders. Writes metrics.json, closes the
    loggers and returns the metrics; sample_keys determine the baseline's samples, fake_keys and the shard folders
    train_inputs (none for a released head) the data the head was trained on."""
    m, out_dir, metrics = cfg.metrics, Path(cfg.paths.output_dir), {}
    if stop >= 3:
        discriminator.to(device).eval().requires_grad_(False)
        guided_keys = [*sample_keys, *train_keys(fake_keys), "guidance"]
        folders = {prefix: sample_to(cfg, build_sample_fn(guide), stage_dir(cfg, stage, keys, inputs), m.num_samples,
                                     m.sampling_seed, keys, shape, True, device)
                   for prefix, stage, keys, inputs, guide in (
                       ("eval", "sample_dg", guided_keys, train_inputs, discriminator),
                       ("eval_unguided", "sample_unguided", sample_keys, (), None))}
        if stop >= 4:
            metrics.update(evaluate_folders(cfg, folders, out_dir, device))
    write_metrics(out_dir, metrics)
    finish_loggers(loggers, metrics)
    return metrics


def encode_dir(cfg: DictConfig):
    """The folder of stage encode (the real data's shards, an input of the stages trained on them)."""
    return stage_dir(cfg, "encode", ENCODE_KEYS)


def encode_real(cfg: DictConfig, encoder, device):
    """Stage encode: the image folder's centre crops as shards (latents of `encoder`, or uint8 crops when it is None),
    read back in place (sources.shard_source)."""
    d, folder = cfg.data, encode_dir(cfg)
    encode_image_folder(encoder, d.image_dir, folder, image_size=d.image_size, flip=d.flip, num_samples=d.num_real,
                        base_seed=stream_base_seed(cfg.seed, "real"), batch_size=d.encode_batch_size,
                        num_workers=d.num_workers, fingerprint=fingerprint(cfg, ENCODE_KEYS), device=device)
    return shard_source(folder, name=f"real {'images' if encoder is None else 'latents'} in {folder}")


# --- DiT-XL/2-G++ ---

def imagenet_released_files(cfg: DictConfig):
    """{config key: where the file comes from} for every released file (or folder) this DiT-G++ run reads."""
    files = {"score.checkpoint": DIT_SOURCE, "score.vae.path": VAE_SOURCE, "metrics.reference_batch": REFERENCE_SOURCE}
    if not (cfg.trainer.max_epochs != 0 and _trains_classifier(cfg)):
        files["discriminator.classifier.path"] = DG_IMAGENET_SOURCE
    if cfg.discriminator.head_path is not None:
        files["discriminator.head_path"] = DG_IMAGENET_SOURCE
    if cfg.trainer.max_epochs != 0:
        files["data.vae.path"] = VAE_SOURCE
    return files


def check_imagenet_config(cfg: DictConfig):
    """ConfigError before any compute for check_common's problems, inconsistent latent sizes or CFG channels, a
    released head without its released classifier, or a missing released file."""
    check_common(cfg)
    s, d = cfg.sampler, cfg.discriminator
    if cfg.data.image_size != 8 * cfg.score.input_size:
        raise ConfigError("score.input_size", f"is {cfg.score.input_size} but the SD-VAE maps data.image_size="
                          f"{cfg.data.image_size} to latents of {cfg.data.image_size // 8}", "set it to image_size / 8")
    if s.guided_channels is not None and not 1 <= s.guided_channels <= cfg.score.in_channels:
        raise ConfigError("sampler.guided_channels", f"must be null (all) or in 1..{cfg.score.in_channels}, got "
                          f"{s.guided_channels}", "DiT guides the first 3 of the 4 latent channels")
    if d.head_path is not None and _trains_classifier(cfg):
        raise ConfigError("discriminator.classifier.path", f"{d.classifier.path} does not exist, so the latent classifier "
                          f"would be trained here, but discriminator.head_path ({d.head_path}) was trained on the "
                          "released classifier's features", "give the released 32x32_classifier.pt, or train a new "
                          "head (discriminator.head_path=null)")
    require_released(cfg, imagenet_released_files(cfg))


def with_latent_classifier(cfg: DictConfig, real):
    """cfg itself when discriminator.classifier.path holds the released latent classifier; else (train_if_missing)
    stage pretrain_classifier trains one on the real latents (pretrain.NoisyClassifierModule: cross-entropy on
    LVP-diffused latents at uniform times, as ADM's classifier training), saved in the released format, and returns
    a copy of cfg whose discriminator.classifier.path is those weights, so later stages load them and name them in
    their cache keys."""
    if not _trains_classifier(cfg):
        return cfg
    c = cfg.discriminator.classifier
    folder = stage_dir(cfg, "pretrain_classifier", CLASSIFIER_KEYS, inputs=[encode_dir(cfg)])
    weights = folder / "classifier.pt"
    if not weights.exists():
        build = ADM_CLASSIFIERS[c.config].build
        net = build_network(cfg, {"_target_": f"{build.__module__}.{build.__qualname__}",
                                  **OmegaConf.to_container(c.overrides, resolve=True)})
        module = NoisyClassifierModule(net, lr=c.lr, weight_decay=c.weight_decay, t_min=cfg.data.t_min, importance=False)
        pretrain(cfg, module, real, c.batch_size, c.max_steps, module.classifier, weights)
    trained = copy.deepcopy(cfg)
    OmegaConf.update(trained, "discriminator.classifier.path", str(weights))
    return trained


def dit_sample_fn(cfg: DictConfig, dit, discriminator=None, fake_cfg_scale=None, decoder=None, encoder=None):
    """generate's sample_fn(latents, labels, noise): DiT's DDPM sampler (cfg.sampler; a constant CFG scale when
    fake_cfg_scale is given), with DG when a discriminator is given; latents out, or images when a decoder is given,
    or (decoder and encoder, the authors' storage of fakes) latents decoded, quantised and encoded again."""
    s, dg = cfg.sampler, cfg.guidance.dg
    schedule, model_fn = DDPMSchedule(s.num_timesteps, str(s.respacing)), accelerate(dit, build_accel(cfg))
    early, late = (s.cfg_scale, s.cfg_scale_late) if fake_cfg_scale is None else (fake_cfg_scale, fake_cfg_scale)
    guidance = None if discriminator is None else dg_guidance(cfg, discriminator)

    def sample_fn(latents, class_labels, noise):
        with torch.no_grad():  # guidance enables the input gradient itself
            x = ddpm_sampler(model_fn, latents, class_labels, schedule, null_label=cfg.data.num_classes,
                             cfg_scale=early, cfg_scale_late=late, cfg_switch_step=s.cfg_switch_step,
                             guided_channels=s.guided_channels, dg=guidance,
                             dg_weight=dg.weight if guidance else 0.0, dg_switch_step=s.dg_switch_step,
                             clip_denoised=s.clip_denoised, randn_like=noise.randn_like)
        if decoder is not None and encoder is not None:
            return round_trip(decoder, encoder, x, noise, cfg.data.fake_jpeg_quality)
        return x if decoder is None else decoder.decode(x)

    return sample_fn


def run_imagenet(cfg: DictConfig):
    """DiT-XL/2-G++ on ImageNet 256: real images -> latents; DiT fakes (latents, constant CFG) -> conditional DG head
    on the latent ADM classifier (trained here first when its file is missing) -> DiT-G++ and DiT samples from the
    same seeds at equal steps, decoded -> FID, sFID, IS, precision, recall against ADM's reference batch, and the
    samples exported as evaluator npz files."""
    check_imagenet_config(cfg)
    d, s = cfg.data, cfg.score
    stop, loggers, device = _stop(cfg), build_loggers(cfg), _device(cfg)
    dit = load_dit(s.checkpoint, s.model, s.input_size, d.num_classes, in_channels=s.in_channels,
                   **OmegaConf.to_container(s.overrides, resolve=True)).to(device)
    decoder = LatentAutoencoder(instantiate(s.vae)).to(device)
    shape = (s.in_channels, s.input_size, s.input_size)

    discriminator, train_inputs = None, ()
    if cfg.trainer.max_epochs != 0:
        encoder = LatentAutoencoder(instantiate(d.vae)).to(device)
        real = encode_real(cfg, encoder, device)
        if stop >= 1:
            fake_dir = sample_to(cfg, dit_sample_fn(cfg, dit, fake_cfg_scale=d.fake_cfg_scale,
                                                    **({"decoder": decoder, "encoder": encoder} if d.fake_round_trip else {})),
                                 stage_dir(cfg, "generate", FAKE_KEYS), d.num_fake, stream_base_seed(cfg.seed, "fakes"),
                                 FAKE_KEYS, shape, False, device)
        if stop >= 2:
            cfg = with_latent_classifier(cfg, real)
            fake, train_inputs = shard_source(fake_dir, name=f"fake latents in {fake_dir}"), (encode_dir(cfg), fake_dir)
            discriminator = train_discriminator(cfg, real, fake, edm_discriminator(cfg), loggers,
                                                stage_dir(cfg, "train", train_keys(FAKE_KEYS), train_inputs))
    elif stop >= 3:  # the released head as it is, no real latents or fakes needed
        discriminator = edm_discriminator(cfg)
    return sample_and_evaluate(cfg, lambda guide: dit_sample_fn(cfg, dit, guide, decoder=decoder), discriminator,
                               SAMPLE_KEYS, FAKE_KEYS, train_inputs, shape, stop, loggers, device)


# --- ADM-G++ ---

def adm_released_files(cfg: DictConfig):
    """{config key: where the file comes from} for every released file this ADM-G++ run reads."""
    files = {"score.checkpoint": ADM_SOURCE_256, "discriminator.classifier.path": ADM_SOURCE_256,
             "metrics.reference_batch": REFERENCE_SOURCE}
    if cfg.discriminator.head_path is not None:
        files["discriminator.head_path"] = ADM_CLASSIFIERS[cfg.discriminator.classifier.config].head_source
    return files


def adm_image_sizes(cfg: DictConfig):
    """{config key: the image size of the network its file is loaded into}: the UNet of load_adm_unet and the
    classifier of edm_discriminator, built from score.overrides and discriminator.classifier on the meta device (their
    architectures alone: no file read, no weights allocated)."""
    c = cfg.discriminator.classifier
    with torch.device("meta"):
        unet = adm256_cond(**OmegaConf.to_container(cfg.score.overrides, resolve=True))
        classifier = ADM_CLASSIFIERS[c.config].build(**OmegaConf.to_container(c.overrides, resolve=True))
    return {"score.checkpoint": unet.image_size, "discriminator.classifier.path": classifier.image_size}


def check_adm_config(cfg: DictConfig):
    """ConfigError before any compute for check_common's problems, negative guidance scales, a non-positive DG boost,
    a UNet or classifier on another image size than data.image_size, or a missing released file."""
    check_common(cfg)
    s = cfg.sampler
    for key, value in (("sampler.cg_scale", s.cg_scale), ("sampler.cg_scale_late", s.cg_scale_late),
                       ("data.fake_cg_scale", cfg.data.fake_cg_scale)):
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}", "ADM-G++ uses 0.75 / 1.5, ADM-G 1.0; 0 switches CG off")
    if s.dg_boost <= 0:
        raise ConfigError("sampler.dg_boost", f"must be > 0, got {s.dg_boost}", "1 is no boost; the paper's ADM-G++ uses "
                          "1 / 0.75 = 1.3333")
    for key, size in adm_image_sizes(cfg).items():
        if size != cfg.data.image_size:
            raise ConfigError(key, f"{OmegaConf.select(cfg, key)} is loaded into a network on {size}x{size} images but "
                              f"data.image_size is {cfg.data.image_size}", "use the 256x256 files with "
                              "data.image_size=256")
    require_released(cfg, adm_released_files(cfg))


def adm_sample_fn(cfg: DictConfig, model, classifier, discriminator=None, fake_cg_scale=None):
    """generate's sample_fn(latents, labels, noise): ADM's DDPM sampler in pixel space with classifier guidance by the
    256 classifier (fed timesteps 999 tau) and cfg.sampler's schedules, with DG (cfg.guidance.dg) when a
    discriminator is given; with fake_cg_scale, plain ADM-G at that constant scale (the fakes). Images in [-1, 1]."""
    s, dg = cfg.sampler, cfg.guidance.dg
    schedule, accel = DDPMSchedule(s.num_timesteps, str(s.respacing)), build_accel(cfg)
    model_fn, run_classifier = accelerate(model, accel), accelerate(classifier, accel)
    cg = ClassifierGuidance(lambda x, tau: run_classifier(x, 999.0 * tau))
    guidance = None if discriminator is None else dg_guidance(cfg, discriminator)
    if fake_cg_scale is None:
        cg_kwargs = {"cg_scale": s.cg_scale, "cg_scale_late": s.cg_scale_late, "cg_switch_step": s.cg_switch_step,
                     "eds": s.eds}
    else:
        cg_kwargs = {"cg_scale": fake_cg_scale}

    def sample_fn(latents, class_labels, noise):
        with torch.no_grad():  # guidance enables the input gradient itself
            return ddpm_sampler(model_fn, latents, class_labels, schedule, classifier=cg, dg=guidance,
                                dg_weight=dg.weight if guidance else 0.0, dg_switch_step=s.dg_switch_step,
                                dg_boost=s.dg_boost, dg_norm_ratio=s.dg_norm_ratio,
                                clip_denoised=s.clip_denoised, randn_like=noise.randn_like, **cg_kwargs)

    return sample_fn


def run_imagenet_adm(cfg: DictConfig):
    """ADM-G++ on ImageNet 256 in pixel space: real images -> uint8 centre crops; ADM-G fakes (constant CG) ->
    conditional DG head on the 256 classifier's 512x8x8 features -> ADM-G++ (CG + DG with Table D.1's schedules)
    and ADM-G (the same CG, no DG) from the same seeds at equal steps -> ADM's evaluation, as run_imagenet."""
    check_adm_config(cfg)
    d = cfg.data
    stop, loggers, device = _stop(cfg), build_loggers(cfg), _device(cfg)
    model = load_adm_unet(cfg.score.checkpoint, **OmegaConf.to_container(cfg.score.overrides, resolve=True)).to(device)
    discriminator = edm_discriminator(cfg).to(device)
    classifier = discriminator.feature_extractor  # the whole 256 classifier: its logits guide, its features feed DG
    shape, train_inputs = (3, d.image_size, d.image_size), ()

    if cfg.trainer.max_epochs != 0:  # else: the released head as it is, no real images or fakes needed
        real = encode_real(cfg, None, device)
        if stop >= 1:
            fake_dir = sample_to(cfg, adm_sample_fn(cfg, model, classifier, fake_cg_scale=d.fake_cg_scale),
                                 stage_dir(cfg, "generate", ADM_FAKE_KEYS), d.num_fake,
                                 stream_base_seed(cfg.seed, "fakes"), ADM_FAKE_KEYS, shape, True, device)
        if stop >= 2:
            fake, train_inputs = shard_source(fake_dir, name=f"fake images in {fake_dir}"), (encode_dir(cfg), fake_dir)
            discriminator = train_discriminator(cfg, real, fake, discriminator, loggers,
                                                stage_dir(cfg, "train", train_keys(ADM_FAKE_KEYS), train_inputs))
    return sample_and_evaluate(cfg, lambda guide: adm_sample_fn(cfg, model, classifier, guide), discriminator,
                               ADM_SAMPLE_KEYS, ADM_FAKE_KEYS, train_inputs, shape, stop, loggers, device)
