"""DiT-XL/2-G++ on ImageNet 256 (paper Table 4): real images -> SD-VAE latents; DiT fakes (latents, constant CFG) ->
conditional DG head on the latent ADM classifier (trained here first when its file is missing) -> DiT-G++ and DiT
samples from the same seeds at equal steps, decoded -> ADM's evaluation (pipelines.imagenet)."""

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dg_lightning.checkpoints import ADM_CLASSIFIERS, DG_IMAGENET_SOURCE, DIT_SOURCE, load_dit
from dg_lightning.config import ConfigError
from dg_lightning.evaluation import REFERENCE_ARRAYS, REFERENCE_SOURCE
from dg_lightning.latents import VAE_SOURCE, LatentAutoencoder, round_trip
from dg_lightning.pipelines import imagenet
from dg_lightning.pipelines.images import device_of
from dg_lightning.pipelines.recipe import Pipeline, Stage
from dg_lightning.pretrain import NoisyClassifierModule
from dg_lightning.released import require_arrays, require_released
from dg_lightning.sampling import build_sampler
from dg_lightning.seeds import stream_base_seed
from dg_lightning.training import build_network, pretrain

FAKE_KEYS = ("seed", "sampler.solver", "sampler.schedule", "sampler.guided_channels", "sampler.clip_denoised",
             "data.num_classes", "data.image_size", "data.fake_cfg_scale", "data.num_fake", "data.num_held_out",
             "data.fake_round_trip", "data.fake_jpeg_quality")
CLASSIFIER_KEYS = ("seed", "data.t_min", *(f"discriminator.classifier.{k}" for k in
                                           ("config", "overrides", "batch_size", "max_steps", "lr", "weight_decay")))


def trains_classifier(cfg: DictConfig):
    """Whether this run trains the latent classifier: it trains a head, there is no file at
    discriminator.classifier.path and train_if_missing is set."""
    c = cfg.discriminator.classifier
    return imagenet.trains(cfg) and bool(c.get("train_if_missing", False)) and not Path(c.path).exists()


def released_files(cfg: DictConfig):
    """{config key: where the file comes from} for every released file (or folder) this DiT-G++ run reads."""
    files = {"score.checkpoint": DIT_SOURCE, "score.vae.path": VAE_SOURCE, "metrics.reference_batch": REFERENCE_SOURCE}
    if not trains_classifier(cfg):
        files["discriminator.classifier.path"] = DG_IMAGENET_SOURCE
    if cfg.discriminator.head_path is not None:
        files["discriminator.head_path"] = DG_IMAGENET_SOURCE
    if imagenet.trains(cfg):
        files["data.vae.path"] = VAE_SOURCE
    return files


def check(cfg: DictConfig):
    """ConfigError before any compute for imagenet.check_common's problems, inconsistent latent sizes or CFG channels,
    a released head without its released classifier, a missing released file, or a reference batch without its arrays."""
    imagenet.check_common(cfg)
    s, d = cfg.sampler, cfg.discriminator
    if cfg.data.image_size != 8 * cfg.score.input_size:
        raise ConfigError("score.input_size", f"is {cfg.score.input_size} but the SD-VAE maps data.image_size="
                          f"{cfg.data.image_size} to latents of {cfg.data.image_size // 8}", "set it to image_size / 8")
    if s.guided_channels is not None and not 1 <= s.guided_channels <= cfg.score.in_channels:
        raise ConfigError("sampler.guided_channels", f"must be null (all) or in 1..{cfg.score.in_channels}, got "
                          f"{s.guided_channels}", "DiT guides the first 3 of the 4 latent channels")
    if d.head_path is not None and trains_classifier(cfg):
        raise ConfigError("discriminator.classifier.path", f"{d.classifier.path} does not exist, so the latent classifier "
                          f"would be trained here, but discriminator.head_path ({d.head_path}) was trained on the "
                          "released classifier's features", "give the released 32x32_classifier.pt, or train a new "
                          "head (discriminator.head_path=null)")
    require_released(cfg, released_files(cfg))
    require_arrays(cfg, "metrics.reference_batch", REFERENCE_ARRAYS, REFERENCE_SOURCE)


def dit_sample_fn(cfg: DictConfig, dit, discriminator=None, fake_cfg_scale=None, decoder=None, encoder=None):
    """generate's sample_fn(latents, labels, noise): cfg.sampler on DiT (a constant CFG scale when fake_cfg_scale is
    given), with DG when a discriminator is given; latents out, or images when a decoder is given, or (decoder and
    encoder, the authors' storage of fakes) latents decoded, quantised and encoded again."""
    constant = {} if fake_cfg_scale is None else {"cfg_scale": fake_cfg_scale, "cfg_scale_late": fake_cfg_scale}
    sample = build_sampler(cfg, dit, discriminator, null_label=cfg.data.num_classes, **constant)

    def sample_fn(latents, class_labels, noise):
        with torch.no_grad():  # guidance enables the input gradient itself
            x = sample(latents, class_labels, noise)
        if decoder is not None and encoder is not None:
            return round_trip(decoder, encoder, x, noise, cfg.data.fake_jpeg_quality)
        return x if decoder is None else decoder.decode(x)

    sample_fn.nfe = sample.nfe  # each batch's NFE, which generate stores in the shards
    return sample_fn


def load(run):
    """DiT from its released state dict and the SD-VAE decoder, on the run's device; sample_fn(cfg, discriminator=)
    gives decoded images."""
    cfg, s = run.cfg, run.cfg.score
    dit = load_dit(s.checkpoint, s.model, s.input_size, cfg.data.num_classes, in_channels=s.in_channels,
                   **OmegaConf.to_container(s.overrides, resolve=True)).to(device_of(cfg))
    decoder = LatentAutoencoder(instantiate(s.vae)).to(device_of(cfg))
    return SimpleNamespace(dit=dit, decoder=decoder, shape=(s.in_channels, s.input_size, s.input_size),
                           sample_fn=partial(dit_sample_fn, dit=dit, decoder=decoder))


def encoder(run):
    """The SD-VAE encoder of the real images (and of the fakes with data.fake_round_trip)."""
    return LatentAutoencoder(instantiate(run.cfg.data.vae)).to(device_of(run.cfg))


def encode(run):
    """The ImageNet train folder's centre crops as SD-VAE latents."""
    return imagenet.encode_real(run.cfg, run.results["encoder"], run.folder)


def generate_fakes(run):
    """data.num_fake + data.num_held_out DiT fakes as latents, with the constant CFG scale data.fake_cfg_scale, at the
    fakes' seed stream: the last data.num_held_out held out of training."""
    cfg, loaded, d = run.cfg, run.results["load"], run.cfg.data
    round_trip_with = {"decoder": loaded.decoder, "encoder": run.results["encoder"]} if d.fake_round_trip else {}
    sample_fn = dit_sample_fn(cfg, loaded.dit, fake_cfg_scale=d.fake_cfg_scale, **round_trip_with)
    imagenet.sample_to(cfg, sample_fn, run.folder, d.num_fake + d.num_held_out, stream_base_seed(cfg.seed, "fakes"),
                       FAKE_KEYS, loaded.shape, False)


def pretrain_classifier(run):
    """No released latent classifier: one trained on the real latents (pretrain.NoisyClassifierModule: cross-entropy
    on LVP-diffused latents at uniform times, as ADM's classifier training), saved in the released format; returns
    its path."""
    cfg, c = run.cfg, run.cfg.discriminator.classifier
    weights = run.folder / "classifier.pt"
    if not weights.exists():
        build = ADM_CLASSIFIERS[c.config].build
        net = build_network(cfg, {"_target_": f"{build.__module__}.{build.__qualname__}",
                                  **OmegaConf.to_container(c.overrides, resolve=True)})
        module = NoisyClassifierModule(net, lr=c.lr, weight_decay=c.weight_decay, t_min=cfg.data.t_min, importance=False)
        pretrain(cfg, module, run.results["encode"], c.batch_size, c.max_steps, module.classifier, weights)
    return str(weights)


PIPELINE = Pipeline("imagenet", check=check, stages=(
    Stage("load", load, keys=("score", "data.num_classes"), files=("score.checkpoint", "score.vae.path")),
    Stage("encoder", encoder, keys=("data.vae",), files=("data.vae.path",), when=imagenet.trains),
    Stage("encode", encode, keys=imagenet.ENCODE_KEYS, files=imagenet.ENCODE_FILES, inputs=("encoder",),
          when=imagenet.trains),
    Stage("generate", generate_fakes, keys=FAKE_KEYS, inputs=("load", "encoder"), when=imagenet.trains,
          uses=("sampler.cfg_scale", "sampler.cfg_scale_late", "sampler.cfg_switch_step")),
    Stage("pretrain_classifier", pretrain_classifier, keys=CLASSIFIER_KEYS, inputs=("encode",), when=trains_classifier),
    imagenet.imagenet_train_stage("encode", "generate", "pretrain_classifier"),
    Stage("sample_unguided", imagenet.sample_unguided, keys=imagenet.SAMPLE_KEYS, inputs=("load",)),
    Stage("sample", imagenet.sample, keys=(*imagenet.SAMPLE_KEYS, "guidance"), inputs=("load", "train")),
    Stage("evaluate", imagenet.evaluate_samples, keys=("metrics",), files=imagenet.EVALUATE_FILES,
          inputs=("sample", "sample_unguided")),
))
