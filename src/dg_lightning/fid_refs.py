"""FID reference statistics of real images, for rows whose statistics were not released (CelebA 64):

    python -m dg_lightning.fid_refs experiment=celeba64_st_g++ [paths.released_dir=DIR key=value ...]

writes metrics.fid_reference, an .npz with mu (D,) and sigma (D, D) in float64 (the layout of EDM's fid-refs), from
every image of data.path read as the experiment reads its real data (data.crop, at the classifier's resolution, which
the run checks against the score network's), in the experiment's feature space (metrics.features: the Inception of
metrics.inception_path, or metrics.feature_net). An existing file is never overwritten.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from dg_lightning.config import ConfigError, compose_config
from dg_lightning.files import write_atomic
from dg_lightning.progress import track
from dg_lightning.sources import load_source


def reference_statistics(features, images, batch_size):
    """(mu, sigma) in float64 of features(batch) over uint8 NHWC images (a numpy array): the mean and the unbiased
    covariance, as torchmetrics' FID computes them for its real side."""
    total, outer, count = 0.0, 0.0, 0
    for batch in track(torch.from_numpy(images).split(batch_size), "reference features"):
        with torch.no_grad():
            f = features(batch.permute(0, 3, 1, 2)).double()
        total, outer, count = total + f.sum(0), outer + f.T @ f, count + len(f)
    mu = total / count
    return mu.numpy(), ((outer - count * torch.outer(mu, mu)) / (count - 1)).numpy()


def main(overrides):
    """Compose the config, refuse an existing or unset metrics.fid_reference before any compute, write it."""
    from dg_lightning.pipelines.edm import classifier_resolution, features_of

    cfg = compose_config(overrides)
    out = cfg.metrics.get("fid_reference")
    if out is None:
        raise ConfigError("metrics.fid_reference", "is not set", "pick an experiment that compares with reference "
                          "statistics (e.g. experiment=celeba64_st_g++) or set metrics.fid_reference=PATH.npz")
    out = Path(out)
    if out.exists():
        raise ConfigError("metrics.fid_reference", f"{out} exists already and is never overwritten",
                          "delete it first, or write elsewhere with metrics.fid_reference=PATH.npz")
    real = load_source(cfg.data.path, "data.path", classifier_resolution(cfg), 3, labels=False, crop=cfg.data.crop)
    mu, sigma = reference_statistics(features_of(cfg).eval(), real.samples, cfg.metrics.batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: np.savez(f, mu=mu, sigma=sigma))
    print(f"{out}: FID reference statistics of {len(real)} images of {cfg.data.path} ({mu.shape[0]} features)")


if __name__ == "__main__":
    main(sys.argv[1:])
