"""What the two ImageNet 256 pipelines (imagenet_dit: DiT-XL/2-G++, paper Table 4; imagenet_adm: ADM-G++, Table D.1)
share: their checks, the encode stage (the ImageNet train folder as labelled shards), the head's training, sharded
sampling to uint8 images, the G++ and baseline sampling stages, and the evaluate stage (FID, sFID, IS, precision, recall against ADM's
reference batch, and the evaluator's npz exports)."""

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from dg_lightning.callbacks import SamplingTask
from dg_lightning.config import ConfigError, require_count, require_held_out
from dg_lightning.evaluation import ADMInception, ADMMetrics, evaluate, export_samples, load_reference_batch
from dg_lightning.generate import generate
from dg_lightning.latents import shard_image_folder
from dg_lightning.pipelines.images import device_of, nfe_metrics
from dg_lightning.pipelines.recipe import fingerprint, train_stage
from dg_lightning.released import DISCRIMINATOR_FILES, check_discriminator_config, dg_discriminator
from dg_lightning.seeds import stream_base_seed
from dg_lightning.shards import load_shards
from dg_lightning.sources import image_folder, shard_source
from dg_lightning.held_out import resolve_t_max, sampling_window
from dg_lightning.training import train_discriminator

ENCODE_KEYS = ("seed", "data.image_dir", "data.image_size", "data.flip", "data.num_real")
ENCODE_FILES = ("data.image_dir",)  # fingerprinted by its listing (names, sizes, mtimes)
EVALUATE_FILES = ("metrics.reference_batch", "metrics.inception_path")
SAMPLE_KEYS = ("sampler", "data.image_size", "data.num_classes", "metrics.num_samples", "metrics.sampling_seed")


def trains(cfg: DictConfig):
    """Whether the run trains the head (else it guides with the released head as it is, and needs no real data or
    fakes)."""
    return cfg.trainer.max_epochs != 0


def check_common(cfg: DictConfig):
    """ConfigError before any compute for check_discriminator_config's problems, a bad DDPM schedule, no (or an
    empty) image folder to train on, data.num_real above its number of images, or data.num_held_out not below it."""
    check_discriminator_config(cfg, "discriminator_7.pt")
    try:
        instantiate(cfg.sampler.schedule)
    except Exception as exc:  # hydra wraps the schedule's ValueError
        raise ConfigError("sampler.schedule.respacing", str(exc), "use e.g. 250 of num_timesteps=1000") from exc
    if trains(cfg):
        try:
            files = image_folder(cfg.data.image_dir or "")[0]
        except FileNotFoundError as exc:
            raise ConfigError("data.image_dir", f"{exc}, but training the discriminator needs real images",
                              "point it at ImageNet's train folder (<wnid>/<image>.JPEG), or guide with a released head "
                              "as it is (trainer.max_epochs=0)") from exc
        require_count("data.num_real", cfg.data.num_real, len(files), cfg.data.image_dir)
        require_held_out(cfg.data.num_held_out, cfg.data.num_real or len(files), cfg.data.image_dir)


def encode_real(cfg: DictConfig, encoder, folder):
    """The image folder's centre crops as shards in `folder` (latents of `encoder`, or uint8 crops when it is None),
    read back in place (sources.shard_source)."""
    d = cfg.data
    shard_image_folder(encoder, d.image_dir, folder, image_size=d.image_size, flip=d.flip, num_samples=d.num_real,
                        base_seed=stream_base_seed(cfg.seed, "real"), batch_size=d.encode_batch_size,
                        num_workers=d.num_workers, fingerprint=fingerprint(cfg, ENCODE_KEYS), device=device_of(cfg))
    return shard_source(folder, name=f"real {'images' if encoder is None else 'latents'} in {folder}")


def sample_to(cfg: DictConfig, sample_fn, folder, num_samples, base_seed, keys, shape, images):
    """Sharded, resumable samples of generate's sample_fn from N(0, I) of `shape`, labels drawn per sample index:
    uint8 images of data.image_size when `images`, else float32 arrays of `shape` (latents); returns the folder."""
    size = cfg.data.image_size
    generate(sample_fn, folder, num_samples, shape, base_seed=base_seed, batch_size=cfg.metrics.sample_batch_size,
             num_classes=cfg.data.num_classes, out_shape=(3, size, size) if images else None,
             dtype="uint8" if images else "float32", fingerprint=fingerprint(cfg, keys), device=device_of(cfg))
    return folder


def features_and_reference(cfg: DictConfig):
    """(the evaluation's feature network: ADMInception from metrics.inception_path, or metrics.feature_net; ADM's
    reference batch at metrics.reference_batch, checked against the network's feature sizes)."""
    m = cfg.metrics
    features = ADMInception(m.inception_path) if m.features == "inception" else instantiate(m.feature_net)
    return features, load_reference_batch(m.reference_batch, features.num_features, features.num_spatial)


def sampling_task(cfg: DictConfig, loaded):
    """The guided-sampling callback's task: DG samples of the load stage's sample_fn from the current discriminator,
    scored as the evaluate stage scores (FID, sFID, IS, precision / recall against ADM's reference batch)."""
    features, reference = features_and_reference(cfg)
    window = sampling_window(cfg)
    return SamplingTask(lambda discriminator, latents, labels, noise: loaded.sample_fn(window, discriminator=discriminator)(
                            latents, labels, noise),
                        ADMMetrics(features, reference, cfg.metrics.k).to(device_of(cfg)), loaded.shape,
                        real_images=torch.from_numpy(reference.images).permute(0, 3, 1, 2),
                        num_classes=cfg.data.num_classes, batch_size=cfg.metrics.sample_batch_size)


def train(run):
    """DG's conditional head on the frozen ADM classifier (the one trained by pretrain_classifier, when it ran):
    trained on the encoded real data against the fakes (the last data.num_held_out of each held out) with the
    guided-sampling callback, the epoch that discriminator.select picks; or the released head as it is
    (trainer.max_epochs=0); frozen, on the run's device."""
    cfg = run.cfg
    discriminator = dg_discriminator(cfg, run.results.get("pretrain_classifier"))
    if trains(cfg):
        fakes = run.folders["generate"]
        discriminator = train_discriminator(cfg, run.results["encode"], shard_source(fakes, name=f"fakes in {fakes}"),
                                            discriminator, run.loggers, run.folder,
                                            lambda: sampling_task(cfg, run.results["load"]), run.metrics)
    return discriminator.to(device_of(cfg)).eval().requires_grad_(False)


SCORING = ("sampler", "metrics.features", "metrics.feature_net", "metrics.k", *EVALUATE_FILES)  # what the sampling
                                                                           # callback's scores depend on, besides the head


def imagenet_train_stage(*inputs):
    """The train stage of an ImageNet pipeline, on the load stage and `inputs` (the real data, the fakes, ...)."""
    return train_stage(train, ("seed", "data", "discriminator"), SCORING, DISCRIMINATOR_FILES, EVALUATE_FILES,
                       inputs=("load", *inputs))


def _sample(run, cfg, discriminator, keys):
    """metrics.num_samples uint8 images at the evaluation's seeds from the load stage's sample_fn(cfg, discriminator=)
    (cfg: this stage's config view, its DG window resolved), in the stage's folder."""
    m, loaded = cfg.metrics, run.results["load"]
    return sample_to(cfg, loaded.sample_fn(cfg, discriminator=discriminator), run.folder, m.num_samples, m.sampling_seed, keys,
                     loaded.shape, True)


def sample(run):
    """The G++ samples: DG with the trained (or released) head, over the window guidance.dg (t_max=auto: the trained
    head's, resolve_t_max)."""
    cfg = resolve_t_max(run.cfg, run.folders["train"], run.metrics)
    return _sample(run, cfg, run.results["train"], (*SAMPLE_KEYS, "guidance"))


def sample_unguided(run):
    """The baseline: the same seeds and labels without DG (shared by every DG setting)."""
    return _sample(run, run.cfg, None, SAMPLE_KEYS)


def evaluate_samples(run):
    """{"<set>/<metric>"} of the G++ samples (eval) and the baseline (eval_unguided) against ADM's reference batch
    (metrics.features: Inception, or a stand-in feature_net), and their NFE per sample, each set exported as
    <run folder>/<set>_samples.npz."""
    m = run.cfg.metrics
    features, reference = features_and_reference(run.cfg)
    for prefix, stage in (("eval", "sample"), ("eval_unguided", "sample_unguided")):
        images, labels = load_shards(run.results[stage])
        scores = evaluate(features, images, reference, m.batch_size, device_of(run.cfg), m.k)
        run.metrics.update({f"{prefix}/{k}": v for k, v in scores.items()})
        if m.export:
            export_samples(run.out_dir / f"{prefix}_samples.npz", images, labels)
    run.metrics.update(nfe_metrics({"eval": run.results["sample"], "eval_unguided": run.results["sample_unguided"]}))
