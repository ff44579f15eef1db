"""Helpers shared by the image pipelines: sharded sampling of an image score model (or of a latent one, decoded)
through the sampler builder, the mean NFE of a sample folder, frozen weights from a stage file and the device a run's
networks use."""

import torch
from omegaconf import DictConfig

from dg_lightning.files import load_weights
from dg_lightning.generate import generate
from dg_lightning.pipelines.recipe import fingerprint
from dg_lightning.sampling import build_sampler
from dg_lightning.shards import load_nfe, load_shards


def device_of(cfg: DictConfig):
    """The device the networks run on: the GPU for trainer.accelerator gpu / cuda, else the CPU."""
    return torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")


def frozen(net, weights):
    """net with the state dict in `weights` (weights_only), in eval mode, without parameter gradients."""
    net.load_state_dict(load_weights(weights))
    return net.eval().requires_grad_(False)


class Decoded:
    """generate's sample_fn of a latent sampler whose latents the decoder (decode(latents) -> images in [-1, 1], and
    its image_shape) maps to images; nfe is the latent sampler's count of score-model evaluations."""

    def __init__(self, sample_fn, decoder):
        self.sample_fn, self.decoder = sample_fn, decoder

    @property
    def nfe(self):
        """The latent sampler's NFE per batch (sampling.SampleFn.nfe)."""
        return self.sample_fn.nfe

    def __call__(self, latents, class_labels, noise=None):
        """Images of the latents sampled from `latents`."""
        return self.decoder.decode(self.sample_fn(latents, class_labels, noise))


def image_sampler(cfg: DictConfig, score_model, discriminator=None, decoder=None):
    """generate's sample_fn of the configured sampler on score_model (with DG when a discriminator is given), its
    samples decoded to images by the decoder of a latent score model when one is given."""
    sample_fn = build_sampler(cfg, score_model, discriminator)
    return sample_fn if decoder is None else Decoded(sample_fn, decoder)


def sample_images(cfg: DictConfig, score_model, folder, num_samples, base_seed, discriminator=None, num_classes=None,
                  decoder=None):
    """uint8 NHWC images of the configured sampler on an image score model (an EDM denoiser or a VP score model with
    img_channels and img_resolution; with DG when a discriminator is given), or on a latent one whose samples the
    decoder maps to images, through the sharded, resumable generator, on the model's device; with num_classes, sample
    i gets an int64 class label drawn from its own seed. The shard folder's manifest holds the sampler's (and
    guidance's) fingerprint."""
    shape = (score_model.img_channels, score_model.img_resolution, score_model.img_resolution)
    keys = ["sampler", "guidance"] if discriminator is not None else ["sampler"]
    generate(image_sampler(cfg, score_model, discriminator, decoder), folder, num_samples, shape, base_seed=base_seed,
             batch_size=cfg.metrics.batch_size, num_classes=num_classes,
             out_shape=None if decoder is None else decoder.image_shape, fingerprint=fingerprint(cfg, keys),
             device=next(score_model.parameters()).device)
    return load_shards(folder)[0]


def mean_nfe(folder):
    """The mean number of score-model evaluations per sample over a finished sample folder (shards.load_nfe), or None
    when its shards store no NFE."""
    nfe = load_nfe(folder)
    return None if nfe is None else float(nfe.mean())


def nfe_metrics(folders):
    """{"<prefix>/nfe": the mean NFE per sample} of the sample folders {prefix: folder} whose shards store NFE."""
    means = {prefix: mean_nfe(folder) for prefix, folder in folders.items()}
    return {f"{prefix}/nfe": nfe for prefix, nfe in means.items() if nfe is not None}
