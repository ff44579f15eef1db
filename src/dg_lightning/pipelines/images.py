"""Helpers shared by the image pipelines: sharded sampling of an image score model through the sampler builder,
frozen weights from a stage file and the device a run's networks use."""

import torch
from omegaconf import DictConfig

from dg_lightning.files import load_weights
from dg_lightning.generate import generate
from dg_lightning.pipelines.recipe import fingerprint
from dg_lightning.sampling import build_sampler
from dg_lightning.shards import load_shards


def device_of(cfg: DictConfig):
    """The device the networks run on: the GPU for trainer.accelerator gpu / cuda, else the CPU."""
    return torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")


def frozen(net, weights):
    """net with the state dict in `weights` (weights_only), in eval mode, without parameter gradients."""
    net.load_state_dict(load_weights(weights))
    return net.eval().requires_grad_(False)


def sample_images(cfg: DictConfig, score_model, folder, num_samples, base_seed, discriminator=None, num_classes=None):
    """uint8 NHWC images of the configured sampler on an image score model (an EDM denoiser or a VP score model with
    img_channels and img_resolution; with DG when a discriminator is given) through the sharded, resumable generator,
    on the model's device; with num_classes, sample i gets an int64 class label drawn from its own seed. The shard
    folder's manifest holds the sampler's (and guidance's) fingerprint."""
    shape = (score_model.img_channels, score_model.img_resolution, score_model.img_resolution)
    keys = ["sampler", "guidance"] if discriminator is not None else ["sampler"]
    generate(build_sampler(cfg, score_model, discriminator), folder, num_samples, shape, base_seed=base_seed,
             batch_size=cfg.metrics.batch_size, num_classes=num_classes, fingerprint=fingerprint(cfg, keys),
             device=next(score_model.parameters()).device)
    return load_shards(folder)[0]
