"""Distribution metrics: sliced Wasserstein distance, improved precision/recall, FID, KID, IS, and the feature extractors they use."""

import copy
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import poly_mmd
from torchmetrics.utilities import dim_zero_cat

from dg_lightning.distributed import rank_and_world_size
from dg_lightning.files import UnsafeWeightsError, load_weights
from dg_lightning.progress import track

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


class SlicedWasserstein(Metric):
    """sliced_wasserstein of the fake points (gathered over all ranks) to a fixed reference sample of the same size:
    the guided-sampling callback's metric for point data (the toy), with the SamplingTask attributes of
    GenerativeMetrics; the reference stays through reset()."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    names = ("swd",)
    needs_real_images = False
    keeps_real_features = True

    def __init__(self, reference, num_projections=512, seed=0, **kwargs):
        super().__init__(**kwargs)
        if not torch.is_tensor(reference) or reference.ndim != 2:
            raise ValueError(f"SlicedWasserstein reference must be a (N, D) tensor of points, got "
                             f"{tuple(reference.shape) if torch.is_tensor(reference) else type(reference).__name__}")
        self.reference, self.num_projections, self.seed = reference.detach().cpu(), num_projections, seed
        self.add_state("fake", default=[], dist_reduce_fx="cat")

    def update(self, points, real):
        """Store a (B, D) batch of fake points (there is no real side: the reference is fixed)."""
        if real:
            raise ValueError("SlicedWasserstein has a fixed reference and takes no real points")
        self.fake.append(points.detach())

    def compute(self):
        """{"swd": the sliced W2 distance of all fake points to the reference}; their number must be the reference's."""
        fake = dim_zero_cat(self.fake) if len(self.fake) else torch.empty(0, self.reference.shape[1])
        if fake.shape != self.reference.shape:
            raise ValueError(f"SlicedWasserstein needs as many fake points as reference points {tuple(self.reference.shape)}, "
                             f"got {tuple(fake.shape)}: sample callbacks.sampling.num_samples points")
        return {"swd": sliced_wasserstein(fake, self.reference, self.num_projections, self.seed)}


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


def canonical_order(x):
    """The rows of x sorted by their projection on a fixed direction: the same order however they were gathered from
    the ranks (rows with equal projections are, up to float64 ties, equal rows)."""
    direction = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(x.device)
    return x[torch.argsort(x @ direction, stable=True)]


class KernelDistance(Metric):
    """KID (Binkowski et al. 2018): unbiased MMD^2 between real and fake feature vectors with the cubic kernel
    k(x, y) = (x.y / D + 1)^3, averaged over `subsets` random subsets of subset_size rows of each side (capped at the
    smaller side), drawn from a generator seeded with `seed` so every rank and every run draws the same subsets."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, subsets=100, subset_size=1000, seed=0, reset_real_features=True, **kwargs):
        super().__init__(**kwargs)
        for name, value in [("subsets", subsets), ("subset_size", subset_size)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KernelDistance {name} must be a positive int, got {value!r}")
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed
        self.reset_real_features = reset_real_features
        self.add_state("real", default=[], dist_reduce_fx="cat")
        self.add_state("fake", default=[], dist_reduce_fx="cat")

    def update(self, features, real):
        """Stores a (B, D) batch of real or fake feature vectors."""
        if features.ndim != 2:
            raise ValueError(f"KernelDistance.update expects features of shape (B, D), got {tuple(features.shape)}")
        (self.real if real else self.fake).append(features.detach())

    def compute(self):
        """Mean over the subsets of the unbiased MMD^2 (float64)."""
        real, fake = (dim_zero_cat(x).double() if len(x) else torch.empty(0) for x in (self.real, self.fake))
        if min(len(real), len(fake)) < 2:
            raise ValueError(f"KernelDistance needs at least 2 real and 2 fake feature vectors, got {len(real)} and {len(fake)}")
        real, fake = canonical_order(real), canonical_order(fake)  # the subsets do not depend on the ranks' order
        size = min(self.subset_size, len(real), len(fake))
        generator = torch.Generator().manual_seed(self.seed)
        values = [poly_mmd(real[torch.randperm(len(real), generator=generator)[:size].to(real.device)],
                           fake[torch.randperm(len(fake), generator=generator)[:size].to(fake.device)])
                  for _ in range(self.subsets)]
        return torch.stack(values).mean()

    def reset(self):
        """Clears the stored features, keeping the real ones when reset_real_features is False."""
        real = list(self.real)
        super().reset()
        if not self.reset_real_features:
            self.real.extend(real)


class InceptionScore(Metric):
    """IS = exp E_x KL(p(y | x) || p(y)) from any classifier's class logits, p(y) the mean of p(y | x) over the split
    (float64), averaged over consecutive splits of split_size samples (None: one split; ADM's evaluator: 5,000). It
    lies in [1, number of classes]. Under DDP the samples are split in the order of the ranks' gathered states."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, split_size=None, **kwargs):
        super().__init__(**kwargs)
        self.split_size = split_size
        self.add_state("probs", default=[], dist_reduce_fx="cat")

    def update(self, logits):
        """Stores the class probabilities softmax(logits) of a (B, num_classes) batch."""
        if logits.ndim != 2:
            raise ValueError(f"InceptionScore.update expects logits of shape (B, num_classes), got {tuple(logits.shape)}")
        self.probs.append(logits.detach().double().softmax(dim=1))

    def compute(self):
        """The mean over splits of exp of the mean KL divergence between each sample's p(y | x) and the split's p(y)."""
        if not len(self.probs):
            raise ValueError("InceptionScore needs at least one sample, got none")
        probs = dim_zero_cat(self.probs)
        scores = []
        for split in probs.split(self.split_size or len(probs)):
            marginal = split.mean(dim=0, keepdim=True)
            kl = (torch.special.xlogy(split, split) - torch.special.xlogy(split, marginal)).sum(dim=1)
            scores.append(kl.mean().exp())
        return torch.stack(scores).mean()


class ClassifierFeatures(nn.Module):
    """Penultimate features of a classifier (the input of its final nn.Linear `head`) on uint8 images mapped to [-1, 1].

    Works on a copy of the classifier, kept in eval mode; class_logits maps the features through the copied head.
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
        self.head = self.classifier.get_submodule(head)
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

    def class_logits(self, features):
        """The classifier's logits (B, num_classes) from (B, num_features) penultimate features."""
        return self.head(features)


class GreyAsRGB(nn.Module):
    """A 3-channel image feature extractor (Inception) fed grey uint8 (B, 1, H, W) images as three equal channels."""

    def __init__(self, extractor):
        super().__init__()
        self.extractor = extractor
        self.num_features = extractor.num_features

    def forward(self, images):
        """Features of the images with their single channel repeated to RGB."""
        if images.shape[1] != 1:
            raise ValueError(f"GreyAsRGB expects grey images (B, 1, H, W), got {tuple(images.shape)}")
        return self.extractor(images.expand(-1, 3, -1, -1))


def inception_features(weights_path):
    """FID Inception-v3 (torch-fidelity's port of the TF graph) from a local weights file.

    Maps uint8 images of any size to 2048-d pool3 features, resized to 299 like TF1 (antialias=False). torch-fidelity
    reads the file with weights_only=False, so it is first read here with weights_only=True: a file whose pickle would
    run code is refused before torch-fidelity sees it.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at '{path}'. Download torch-fidelity's {INCEPTION_WEIGHTS_NAME} "
            f"from {INCEPTION_WEIGHTS_URL} and pass its path (nothing is downloaded at run time)."
        )
    try:
        load_weights(path)
    except UnsafeWeightsError as exc:
        raise ValueError(f"{exc}: torch-fidelity's {INCEPTION_WEIGHTS_NAME} from {INCEPTION_WEIGHTS_URL}") from exc
    net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path), antialias=False)
    net.num_features = 2048
    return net


FID_REFERENCE_ARRAYS = ("mu", "sigma")  # an FID reference .npz (EDM fid-refs, ADM's statistics)


def load_fid_reference(path, num_features):
    """Reads FID reference statistics (EDM fid-refs / ADM npz arrays `mu` (D,), `sigma` (D, D)) as float64 tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID reference statistics not found at '{path}' (an .npz with arrays 'mu' and 'sigma')")
    with np.load(path) as npz:
        if not set(FID_REFERENCE_ARRAYS) <= set(npz.files):
            raise KeyError(f"FID reference '{path}' must hold arrays 'mu' and 'sigma', found {sorted(npz.files)}")
        mu, sigma = torch.from_numpy(npz["mu"]).double(), torch.from_numpy(npz["sigma"]).double()
    if mu.shape != (num_features,) or sigma.shape != (num_features, num_features):
        raise ValueError(
            f"FID reference '{path}' must hold mu of shape ({num_features},) and sigma of shape "
            f"({num_features}, {num_features}) for {num_features}-d features, got {tuple(mu.shape)} and {tuple(sigma.shape)}"
        )
    return mu, sigma


class ExtractedFeatures(nn.Module):
    """Pass-through 'feature extractor' for FrechetInceptionDistance, fed with features already extracted."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, features):
        """Returns the features unchanged."""
        return features


class GenerativeMetrics(nn.Module):
    """FID (torchmetrics, float64 statistics), improved precision/recall and optionally KID and IS of uint8 images,
    one feature pass per batch.

    FID compares against the real images fed with `real=True`, or against `fid_reference` when given: the path of an
    npz with `mu`, `sigma`, or those statistics as a (mu, sigma) pair of tensors. Precision/recall always need real images; turn them off with `precision_recall=False`.
    `kid_subsets` (None: off) switches KID on, in the same feature space, against the real images.
    `inception_score` computes IS of the fakes from `feature_extractor.class_logits(features)` (a classifier's
    logits, e.g. ClassifierFeatures): IS means something only for a classifier of the data's own classes.
    """

    def __init__(self, feature_extractor, fid_reference=None, precision_recall=True, k=3, reset_real_features=True,
                 kid_subsets=None, kid_subset_size=1000, kid_seed=0, inception_score=False):
        super().__init__()
        num_features = getattr(feature_extractor, "num_features", None)
        if not isinstance(num_features, int):
            raise TypeError(
                f"GenerativeMetrics feature_extractor needs an int attribute num_features (feature dimension), got {num_features!r}"
            )
        if inception_score and not callable(getattr(feature_extractor, "class_logits", None)):
            raise TypeError(
                f"GenerativeMetrics inception_score needs a feature_extractor with class_logits(features) (a classifier, "
                f"e.g. ClassifierFeatures), got {type(feature_extractor).__name__}"
            )
        self.feature_extractor = feature_extractor
        self.reference = (fid_reference if fid_reference is None or isinstance(fid_reference, tuple)
                          else load_fid_reference(fid_reference, num_features))
        self.fid = FrechetInceptionDistance(
            feature=ExtractedFeatures(num_features), normalize=False, reset_real_features=reset_real_features
        )
        self.precision_recall = PrecisionRecall(k=k, reset_real_features=reset_real_features) if precision_recall else None
        self.kid = None if kid_subsets is None else KernelDistance(kid_subsets, kid_subset_size, kid_seed, reset_real_features)
        self.inception_score = InceptionScore() if inception_score else None

    @property
    def names(self):
        """The names of the metrics compute() returns."""
        return ("fid", *(("precision", "recall") if self.precision_recall is not None else ()),
                *(("kid",) if self.kid is not None else ()), *(("is",) if self.inception_score is not None else ()))

    @property
    def needs_real_images(self):
        """Whether any metric compares with real images (FID without a reference, precision / recall, KID)."""
        return self.reference is None or self.precision_recall is not None or self.kid is not None

    @property
    def keeps_real_features(self):
        """Whether reset() keeps the real side (built with reset_real_features=False)."""
        return not self.fid.reset_real_features

    def update(self, images, real):
        """Extracts features of a uint8 (B, C, H, W) batch with autocast off and adds them to the real or fake side."""
        if real and not self.needs_real_images:
            raise ValueError(
                "GenerativeMetrics got real images but uses none: FID reads fid_reference and precision_recall and KID are off"
            )
        with torch.autocast(images.device.type, enabled=False), torch.no_grad():
            features = self.feature_extractor(images)
            if not (real and self.reference is not None):
                self.fid.update(features.double(), real)
            for metric in (self.precision_recall, self.kid):
                if metric is not None:
                    metric.update(features, real)
            if self.inception_score is not None and not real:
                self.inception_score.update(self.feature_extractor.class_logits(features))

    def feed(self, images, real, batch_size):
        """update() over this rank's share (rows rank::world_size) of uint8 NHWC images (a numpy array), batch by batch
        on the metrics' device; compute() then reduces over the ranks."""
        rank, world_size = rank_and_world_size()
        device = self.fid.real_features_sum.device
        batches = torch.from_numpy(images[rank::world_size]).split(batch_size)
        for batch in track(batches, f"{'real' if real else 'sample'} features", enabled=rank == 0):
            self.update(batch.to(device).permute(0, 3, 1, 2), real)

    def compute(self):
        """Returns {"fid", "precision", "recall", "kid", "is"} (those switched on) as floats, over all ranks."""
        if self.reference is not None:
            self._write_reference()
        results = {"fid": self.fid.compute().item()}
        if self.precision_recall is not None:
            results.update({name: value.item() for name, value in self.precision_recall.compute().items()})
        if self.kid is not None:
            results["kid"] = self.kid.compute().item()
        if self.inception_score is not None:
            results["is"] = self.inception_score.compute().item()
        return results

    def reset(self):
        """Clears the accumulated features (real ones kept when reset_real_features is False)."""
        self.fid.reset()
        for metric in (self.precision_recall, self.kid, self.inception_score):
            if metric is not None:
                metric.reset()

    def _write_reference(self):
        """Sets FID's real sums to those of 2 samples of mean mu, covariance sigma; on rank 0 only, as ranks' sums add up."""
        mu, sigma = (t.to(self.fid.real_features_sum.device) for t in self.reference)
        weight = 0.0 if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0 else 1.0
        self.fid.real_features_num_samples.fill_(int(2 * weight))
        self.fid.real_features_sum.copy_(weight * 2 * mu)
        self.fid.real_features_cov_sum.copy_(weight * (sigma + 2 * torch.outer(mu, mu)))
