"""LSGM-G++ on CIFAR-10 (paper Table 2): real images -> NVAE latents (posterior samples); latent fakes of LSGM's score
model (RK45 on the latent PF-ODE) -> DG's discriminator trained from scratch on the latents (no pretrained classifier
of them exists: nets.adm.EncoderDiscriminator) -> latent samples with and without DG from the same seeds, decoded by
the NVAE -> FID against the reference statistics (+ precision / recall against the real images), as pipelines.edm
samples and scores."""

from types import SimpleNamespace

from omegaconf import DictConfig, OmegaConf

from dg_lightning.checkpoints import DG_SOURCE, LSGM_SOURCE, load_lsgm
from dg_lightning.config import ConfigError, require_count, require_held_out
from dg_lightning.generate import generate
from dg_lightning.latents import ArrayImages, NVAELatents, shard_images
from dg_lightning.metrics import FID_REFERENCE_ARRAYS
from dg_lightning.nets.adm import EncoderDiscriminator
from dg_lightning.pipelines.edm import (
    SAMPLE,
    SAMPLE_UNGUIDED,
    SCORING,
    SCORING_FILES,
    sampling_task,
)
from dg_lightning.pipelines.images import device_of
from dg_lightning.pipelines.recipe import Pipeline, Stage, fingerprint, train_stage
from dg_lightning.released import FID_REFS_SOURCE, require_arrays, require_released
from dg_lightning.sampling import build_sampler
from dg_lightning.seeds import stream_base_seed
from dg_lightning.sources import load_source, shard_source
from dg_lightning.training import build_network, train_discriminator

REAL_SOURCE = f"{DG_SOURCE} (true_data.npz: the 50,000 CIFAR-10 training images), or EDM's dataset zip of them"
LOAD_KEYS = ("score", "data.path", "data.num_real")
ENCODE_KEYS = ("seed",)  # besides the load stage's folder (the networks and the real images)
FAKE_KEYS = ("seed", "sampler", "data.num_fake", "data.num_held_out")


def released_files(cfg: DictConfig):
    """{config key: where the file comes from} for every released file this run reads."""
    return {"score.checkpoint": LSGM_SOURCE, "data.path": REAL_SOURCE, "metrics.fid_reference": FID_REFS_SOURCE}


def check(cfg: DictConfig):
    """ConfigError before any compute for no discriminator training (LSGM-G++ has no released discriminator), no real
    data left after data.num_held_out, a missing released file (naming the key, the file and where to get it), or FID
    reference statistics without their arrays."""
    if cfg.trainer.max_epochs == 0:
        raise ConfigError("trainer.max_epochs", "is 0, but LSGM-G++ trains its discriminator here (no LSGM discriminator "
                          "was released)", "train it (trainer.max_epochs > 0; the paper: 280)")
    if cfg.data.num_real is not None:
        require_held_out(cfg.data.num_held_out, cfg.data.num_real, cfg.data.path)
    require_released(cfg, released_files(cfg))
    require_arrays(cfg, "metrics.fid_reference", FID_REFERENCE_ARRAYS, FID_REFS_SOURCE)


def load(run):
    """LSGM's latent score model and its NVAE (NVAELatents: loaded.decoder) from score.checkpoint, on the run's device,
    and the real images of data.path at the NVAE's resolution (the first data.num_real)."""
    cfg, s = run.cfg, run.cfg.score
    overrides = OmegaConf.to_container(s.overrides, resolve=True)
    score_model, vae = load_lsgm(s.checkpoint, OmegaConf.to_container(s.vae_overrides, resolve=True), **overrides)
    latent_shape = (vae.latent_channels, vae.latent_resolution)
    if (score_model.img_channels, score_model.img_resolution) != latent_shape:
        raise ConfigError("score.overrides", f"the score model takes {score_model.img_channels} x "
                          f"{score_model.img_resolution}^2 latents but the NVAE makes {latent_shape[0]} x "
                          f"{latent_shape[1]}^2", "give the score model and the NVAE of one LSGM run")
    real = load_source(cfg.data.path, "data.path", vae.img_resolution, vae.img_channels, False, cfg.data.num_real)
    require_count("data.num_real", cfg.data.num_real, len(real), cfg.data.path)
    require_held_out(cfg.data.num_held_out, len(real), cfg.data.path)
    device = device_of(cfg)
    return SimpleNamespace(score_model=score_model.to(device), decoder=NVAELatents(vae).to(device), real=real,
                           num_classes=None)


def encode(run):
    """The real images as NVAE latents, each the posterior sample drawn from its own seed (the real stream), in the
    stage's shards; read back in place (sources.shard_source)."""
    cfg, loaded = run.cfg, run.results["load"]
    shard_images(loaded.decoder, ArrayImages(loaded.real.samples), run.folder, flip=False,
                 base_seed=stream_base_seed(cfg.seed, "real"), batch_size=cfg.data.encode_batch_size,
                 fingerprint=fingerprint(cfg, ENCODE_KEYS), device=device_of(cfg), name="real images")
    return shard_source(run.folder, name=f"real latents in {run.folder}")


def generate_fakes(run):
    """data.num_fake + data.num_held_out latent fakes of the score model (no DG), at the fakes' seed stream: the first
    data.num_fake for training, the rest held out of it."""
    cfg, score_model = run.cfg, run.results["load"].score_model
    shape = (score_model.img_channels, score_model.img_resolution, score_model.img_resolution)
    generate(build_sampler(cfg, score_model), run.folder, cfg.data.num_fake + cfg.data.num_held_out, shape,
             base_seed=stream_base_seed(cfg.seed, "fakes"), batch_size=cfg.metrics.batch_size, dtype="float32",
             fingerprint=fingerprint(cfg, FAKE_KEYS), device=device_of(cfg))
    return shard_source(run.folder, name=f"latent fakes in {run.folder}")


def train(run):
    """DG's discriminator on the latents, trained from scratch (discriminator.net, initialised from
    discriminator.seed) on the real latents against the fakes (the last data.num_held_out of each held out), with the
    guided-sampling callback (samples decoded and scored as the sample stage scores them), the epoch that
    discriminator.select picks; frozen, on the run's device."""
    cfg, loaded = run.cfg, run.results["load"]
    discriminator = EncoderDiscriminator(build_network(cfg, cfg.discriminator.net, cfg.discriminator.seed))
    discriminator = train_discriminator(cfg, run.results["encode"], run.results["generate"], discriminator, run.loggers,
                                        run.folder, lambda: sampling_task(cfg, loaded), run.metrics)
    return discriminator.to(device_of(cfg)).eval().requires_grad_(False)


PIPELINE = Pipeline("lsgm", check=check, stages=(
    Stage("load", load, keys=LOAD_KEYS, uses=("data.num_held_out",), files=("score.checkpoint", "data.path")),
    Stage("encode", encode, keys=ENCODE_KEYS, inputs=("load",)),
    Stage("generate", generate_fakes, keys=FAKE_KEYS, inputs=("load",)),
    train_stage(train, ("seed", "data", "discriminator"), SCORING, (), SCORING_FILES,
                inputs=("load", "encode", "generate")),
    SAMPLE_UNGUIDED,
    SAMPLE,
))
