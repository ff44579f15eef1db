"""Evaluation against ADM's reference batches (guided-diffusion `evaluations/`): FID, sFID, IS, precision, recall,
and the export of samples as the evaluator's sample batch.

A reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) holds `arr_0`, uint8 (N, H, W, 3) reference images (10,000
for ImageNet 256: the real side of precision/recall), and statistics of the whole data set: `mu`, `sigma` of the
2048-d Inception pool features (FID) and `mu_s`, `sigma_s` of the 2023-d spatial features (sFID): the first 7
channels of `mixed_6/conv` (torch-fidelity's Mixed_6d.branch1x1, 192 x 17 x 17), flattened in NHWC order.
IS is exp E KL(p(y|x) || p(y)) of softmax(pool @ W) (1008 classes, no bias), the mean over splits of 5,000 samples.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dg_lightning.files import write_atomic
from dg_lightning.metrics import ExtractedFeatures, GenerativeMetrics, InceptionScore, inception_features
from dg_lightning.progress import track

REFERENCE_SOURCE = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                    "VIRTUAL_imagenet256_labeled.npz")
REFERENCE_ARRAYS = ("arr_0", "mu", "sigma", "mu_s", "sigma_s")  # an ADM reference batch .npz
SPATIAL_CHANNELS = 7    # ADM's sFID keeps the first 7 of mixed_6/conv's 192 channels
IS_SPLIT_SIZE = 5000    # ADM's Inception Score: mean over splits of 5,000 samples


@dataclass(frozen=True)
class ReferenceBatch:
    """An ADM reference batch: uint8 NHWC images and float64 (mu, sigma), (mu_s, sigma_s) tensors."""

    images: np.ndarray
    pool: tuple
    spatial: tuple


def load_reference_batch(path, num_features=2048, num_spatial=2023) -> ReferenceBatch:
    """The reference batch at `path`, its arrays checked against the feature sizes; a clear error otherwise."""
    path = Path(path)
    expected = (f"expected ADM's reference batch ({REFERENCE_SOURCE.rsplit('/', 1)[1]}): 'arr_0' uint8 (N, H, W, 3), "
                f"'mu' ({num_features},), 'sigma' ({num_features}, {num_features}), 'mu_s' ({num_spatial},), "
                f"'sigma_s' ({num_spatial}, {num_spatial})")
    if not path.is_file():
        raise FileNotFoundError(f"reference batch {path} not found; {expected}, from {REFERENCE_SOURCE}")
    with np.load(path) as npz:
        missing = sorted(set(REFERENCE_ARRAYS) - set(npz.files))
        if missing:
            raise ValueError(f"reference batch {path} lacks {missing} (has {sorted(npz.files)}); {expected}")
        arrays = {key: npz[key] for key in REFERENCE_ARRAYS}
    shapes = {"mu": (num_features,), "sigma": (num_features,) * 2, "mu_s": (num_spatial,), "sigma_s": (num_spatial,) * 2}
    images = arrays["arr_0"]
    wrong = [f"{k} {arrays[k].shape}" for k, shape in shapes.items() if arrays[k].shape != shape]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        wrong.append(f"arr_0 {images.dtype} {images.shape}")
    if wrong:
        raise ValueError(f"reference batch {path} has {', '.join(wrong)}; {expected}")
    stats = {k: torch.from_numpy(v).double() for k, v in arrays.items() if k != "arr_0"}
    return ReferenceBatch(images, (stats["mu"], stats["sigma"]), (stats["mu_s"], stats["sigma_s"]))


class ADMInception(nn.Module):
    """The ADM evaluator's three Inception outputs of uint8 NCHW images (any size, TF1 resize to 299): pool (B, 2048),
    spatial (B, 2023) and IS logits (B, 1008), from torch-fidelity's port of the TF graph in a local weights file."""

    num_features, num_spatial = 2048, SPATIAL_CHANNELS * 17 * 17

    def __init__(self, weights_path):
        super().__init__()
        self.net = inception_features(weights_path)
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        self._spatial = None

    def _keep_spatial(self, module, inputs, output):
        """Keep mixed_6/conv's first channels as (B, 17 * 17 * 7), NHWC order as the reference's mu_s."""
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1)

    def forward(self, images):
        """(pool, spatial, logits) float32 features of uint8 (B, 3, H, W) images."""
        pool = self.net(images)
        return pool, self._spatial.float(), pool @ self.net.fc.weight.T


class PooledPixels(nn.Module):
    """A weight-free stand-in with ADMInception's outputs, for smoke runs only (its numbers mean nothing): pool = 4x4
    average-pooled pixels (48), spatial = 8x8 average-pooled first channel (64), logits = pool (48 'classes')."""

    num_features, num_spatial = 48, 64

    def forward(self, images):
        """(pool, spatial, logits) of uint8 (B, 3, H, W) images."""
        x = images.float() / 255.0
        pool = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return pool, F.adaptive_avg_pool2d(x[:, :1], 8).flatten(1), pool


class ADMMetrics(nn.Module):
    """ADM's evaluation as a metric stack of uint8 NCHW images, one Inception pass per batch: FID and sFID against the
    reference batch's (mu, sigma) and (mu_s, sigma_s), IS of the samples (splits of 5,000), improved precision /
    recall (k-NN) against the real images fed with real=True (the reference batch's images, kept across resets);
    correct under DDP (torchmetrics states)."""

    names = ("fid", "precision", "recall", "sfid", "is")
    needs_real_images, keeps_real_features = True, True

    def __init__(self, features, reference: ReferenceBatch, k=3):
        super().__init__()
        self.features = features.eval()
        self.pool = GenerativeMetrics(ExtractedFeatures(features.num_features), fid_reference=reference.pool, k=k,
                                      reset_real_features=False)
        self.spatial = GenerativeMetrics(ExtractedFeatures(features.num_spatial), fid_reference=reference.spatial,
                                         precision_recall=False)
        self.inception_score = InceptionScore(split_size=IS_SPLIT_SIZE)

    @torch.no_grad()
    def update(self, images, real):
        """Add a uint8 (B, 3, H, W) batch: reference images to precision / recall's real side, samples to every metric."""
        pool, spatial, logits = self.features(images)
        self.pool.update(pool, real=real)
        if not real:
            self.spatial.update(spatial, real=False)
            self.inception_score.update(logits)

    def compute(self):
        """{fid, precision, recall, sfid, is} as floats, over all ranks."""
        return {**self.pool.compute(), "sfid": self.spatial.compute()["fid"], "is": self.inception_score.compute().item()}

    def reset(self):
        """Clear the samples' features (the reference images' are kept)."""
        for metric in (self.pool, self.spatial, self.inception_score):
            metric.reset()


def evaluate(features, samples, reference: ReferenceBatch, batch_size=250, device="cpu", k=3):
    """{fid, sfid, is, precision, recall} of uint8 NHWC samples against an ADM reference batch (ADMMetrics)."""
    if samples.dtype != np.uint8 or samples.ndim != 4 or samples.shape[-1] != 3:
        raise ValueError(f"evaluate needs uint8 NHWC RGB samples, got {samples.dtype} {samples.shape}")
    metrics = ADMMetrics(features, reference, k).to(device)
    for is_real, images in ((True, reference.images), (False, samples)):
        for start in track(range(0, len(images), batch_size), f"{'reference' if is_real else 'sample'} features"):
            metrics.update(torch.from_numpy(images[start:start + batch_size]).to(device).permute(0, 3, 1, 2), is_real)
    return metrics.compute()


def export_samples(path, images, labels=None):
    """Write uint8 NHWC images as the ADM evaluator's sample batch: `arr_0`, plus `arr_1` int64 labels when given
    (guided-diffusion's image_sample.py layout)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"the evaluator reads uint8 NHWC RGB images, got {images.dtype} {images.shape}")
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": np.asarray(labels, np.int64)}
    write_atomic(Path(path), lambda f: np.savez(f, **arrays))
    return Path(path)
