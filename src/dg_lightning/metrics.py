"""Distribution metrics: sliced Wasserstein distance, improved precision/recall, FID, and the feature extractors they use."""

import copy
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.utilities import dim_zero_cat

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_NAME}"


def sliced_wasserstein(x, y, num_projections=512, seed=0):
    """Sliced W2 between two equal-size point clouds: sqrt(mean over random unit directions of W2^2 of the 1-D projections)."""
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs samples of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    px = torch.sort(x.double().cpu() @ directions, dim=0).values
    py = torch.sort(y.double().cpu() @ directions, dim=0).values
    return ((px - py) ** 2).mean().sqrt().item()


def _kth_neighbour_radii(x, k, block_size):
    """Distance from each row of x to its k-th nearest other row of x (the row itself, at distance 0, is the first)."""
    return torch.cat([torch.cdist(block, x).kthvalue(k + 1, dim=1).values for block in x.split(block_size)])


def _coverage(queries, reference, radii, block_size):
    """Fraction of query rows lying in at least one ball (reference[j], radii[j]), boundary included."""
    inside = [(torch.cdist(block, reference) <= radii).any(dim=1) for block in queries.split(block_size)]
    return torch.cat(inside).double().mean()


class PrecisionRecall(Metric):
    """Improved precision/recall (Kynkäänniemi et al. 2019) of fake vs real feature vectors: k-NN balls, float64 distances."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, k=3, block_size=1024, reset_real_features=True, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"PrecisionRecall k must be a positive int (number of nearest neighbours), got {k!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"PrecisionRecall block_size must be a positive int (rows per distance block), got {block_size!r}")
        self.k = k
        self.block_size = block_size
        self.reset_real_features = reset_real_features
        self.add_state("real", default=[], dist_reduce_fx="cat")
        self.add_state("fake", default=[], dist_reduce_fx="cat")

    def update(self, features, real):
        """Stores a (B, D) batch of real or fake feature vectors."""
        if features.ndim != 2:
            raise ValueError(f"PrecisionRecall.update expects features of shape (B, D), got {tuple(features.shape)}")
        (self.real if real else self.fake).append(features.detach())

    def compute(self):
        """Returns {"precision": share of fakes inside the real manifold, "recall": share of reals inside the fake manifold}."""
        real, fake = (dim_zero_cat(x).double() if len(x) else torch.empty(0) for x in (self.real, self.fake))
        if min(len(real), len(fake)) <= self.k:
            raise ValueError(
                f"PrecisionRecall needs more than k={self.k} real and fake feature vectors, "
                f"got {len(real)} real and {len(fake)} fake"
            )
        real_radii = _kth_neighbour_radii(real, self.k, self.block_size)
        fake_radii = _kth_neighbour_radii(fake, self.k, self.block_size)
        return {
            "precision": _coverage(fake, real, real_radii, self.block_size),
            "recall": _coverage(real, fake, fake_radii, self.block_size),
        }

    def reset(self):
        """Clears the stored features, keeping the real ones when reset_real_features is False."""
        real = list(self.real)
        super().reset()
        if not self.reset_real_features:
            self.real.extend(real)


class ClassifierFeatures(nn.Module):
    """Penultimate features of a classifier (the input of its final nn.Linear `head`) on uint8 images mapped to [-1, 1].

    Works on a copy of the classifier, kept in eval mode.
    """

    def __init__(self, classifier, head):
        super().__init__()
        layer = classifier.get_submodule(head)
        if not isinstance(layer, nn.Linear):
            raise TypeError(
                f"ClassifierFeatures head must name the classifier's final nn.Linear, got {head!r}: {type(layer).__name__}"
            )
        self.num_features = layer.in_features
        self.classifier = copy.deepcopy(classifier).requires_grad_(False)
        self.classifier.set_submodule(head, nn.Identity())
        self.eval()

    def train(self, mode=True):
        """Keeps the classifier in eval mode whatever the caller asks."""
        return super().train(False)

    def forward(self, images):
        """Maps uint8 (B, C, H, W) images to (B, num_features) penultimate features."""
        if images.dtype != torch.uint8:
            raise TypeError(f"ClassifierFeatures expects uint8 images in 0..255, got dtype {images.dtype}")
        return self.classifier(images.float() / 127.5 - 1).flatten(1)


def inception_features(weights_path):
    """FID Inception-v3 (torch-fidelity's port of the TF graph) from a local weights file.

    Maps uint8 images of any size to 2048-d pool3 features, resized to 299 like TF1 (antialias=False).
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at '{path}'. Download torch-fidelity's {INCEPTION_WEIGHTS_NAME} "
            f"from {INCEPTION_WEIGHTS_URL} and pass its path (nothing is downloaded at run time)."
        )
    net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path), antialias=False)
    net.num_features = 2048
    return net


def load_fid_reference(path, num_features):
    """Reads FID reference statistics (EDM fid-refs / ADM npz arrays `mu` (D,), `sigma` (D, D)) as float64 tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID reference statistics not found at '{path}' (an .npz with arrays 'mu' and 'sigma')")
    with np.load(path) as npz:
        if "mu" not in npz or "sigma" not in npz:
            raise KeyError(f"FID reference '{path}' must hold arrays 'mu' and 'sigma', found {sorted(npz.files)}")
        mu, sigma = torch.from_numpy(npz["mu"]).double(), torch.from_numpy(npz["sigma"]).double()
    if mu.shape != (num_features,) or sigma.shape != (num_features, num_features):
        raise ValueError(
            f"FID reference '{path}' must hold mu of shape ({num_features},) and sigma of shape "
            f"({num_features}, {num_features}) for {num_features}-d features, got {tuple(mu.shape)} and {tuple(sigma.shape)}"
        )
    return mu, sigma


class _Features(nn.Module):
    """Pass-through 'feature extractor' for FrechetInceptionDistance, fed with features already extracted."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, features):
        """Returns the features unchanged."""
        return features


class GenerativeMetrics(nn.Module):
    """FID (torchmetrics, float64 statistics) and improved precision/recall of uint8 images, one feature pass per batch.

    FID compares against the real images fed with `real=True`, or against `fid_reference` (an npz with `mu`,
    `sigma`) when given. Precision/recall always need real images; turn them off with `precision_recall=False`.
    """

    def __init__(self, feature_extractor, fid_reference=None, precision_recall=True, k=3, reset_real_features=True):
        super().__init__()
        num_features = getattr(feature_extractor, "num_features", None)
        if not isinstance(num_features, int):
            raise TypeError(
                f"GenerativeMetrics feature_extractor needs an int attribute num_features (feature dimension), got {num_features!r}"
            )
        self.feature_extractor = feature_extractor
        self.reference = None if fid_reference is None else load_fid_reference(fid_reference, num_features)
        self.fid = FrechetInceptionDistance(
            feature=_Features(num_features), normalize=False, reset_real_features=reset_real_features
        )
        self.precision_recall = PrecisionRecall(k=k, reset_real_features=reset_real_features) if precision_recall else None

    def update(self, images, real):
        """Extracts features of a uint8 (B, C, H, W) batch with autocast off and adds them to the real or fake side."""
        if real and self.reference is not None and self.precision_recall is None:
            raise ValueError(
                "GenerativeMetrics got real images but uses none: FID reads fid_reference and precision_recall is off"
            )
        with torch.autocast(images.device.type, enabled=False), torch.no_grad():
            features = self.feature_extractor(images)
            if not (real and self.reference is not None):
                self.fid.update(features.double(), real)
            if self.precision_recall is not None:
                self.precision_recall.update(features, real)

    def compute(self):
        """Returns {"fid", "precision", "recall"} (the last two only with precision_recall on) as floats, over all ranks."""
        if self.reference is not None:
            self._write_reference()
        results = {"fid": self.fid.compute().item()}
        if self.precision_recall is not None:
            results.update({name: value.item() for name, value in self.precision_recall.compute().items()})
        return results

    def reset(self):
        """Clears the accumulated features (real ones kept when reset_real_features is False)."""
        self.fid.reset()
        if self.precision_recall is not None:
            self.precision_recall.reset()

    def _write_reference(self):
        """Sets FID's real sums to those of 2 samples of mean mu, covariance sigma; on rank 0 only, as ranks' sums add up."""
        mu, sigma = (t.to(self.fid.real_features_sum.device) for t in self.reference)
        weight = 0.0 if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0 else 1.0
        self.fid.real_features_num_samples.fill_(int(2 * weight))
        self.fid.real_features_sum.copy_(weight * 2 * mu)
        self.fid.real_features_cov_sum.copy_(weight * (sigma + 2 * torch.outer(mu, mu)))
