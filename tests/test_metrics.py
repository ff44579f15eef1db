"""Tests for dg_lightning.metrics: precision/recall against a brute-force reference, FID against the Gaussian closed form,
KID against a direct numpy computation, IS in its closed-form limits, reference statistics, feature extractors and their
error messages. CPU only, no network."""

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch
from netutils import write_random_inception_weights
from payloads import leaves_a_marker
from torch import nn

from dg_lightning.metrics import (
    ClassifierFeatures,
    GenerativeMetrics,
    GreyAsRGB,
    InceptionScore,
    KernelDistance,
    PrecisionRecall,
    canonical_order,
    inception_features,
)


def brute_force_precision_recall(real, fake, k):
    """Naive O(N^2) improved precision/recall from full float64 distance matrices."""
    real, fake = real.double(), fake.double()

    def dists(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1).sqrt()

    real_radii = dists(real, real).sort(dim=1).values[:, k]
    fake_radii = dists(fake, fake).sort(dim=1).values[:, k]
    precision = (dists(fake, real) <= real_radii[None, :]).any(dim=1).double().mean().item()
    recall = (dists(real, fake) <= fake_radii[None, :]).any(dim=1).double().mean().item()
    return precision, recall


def fed(metric, real, fake, batch):
    """metric.compute() after feeding it real then fake features in uneven batches of `batch` rows."""
    for chunk in real.split(batch):
        metric.update(chunk, real=True)
    for chunk in fake.split(batch):
        metric.update(chunk, real=False)
    return metric.compute()


def fed_precision_recall(real, fake, batch=17, **kwargs):
    """PrecisionRecall fed in uneven batches of `batch` rows."""
    return {name: value.item() for name, value in fed(PrecisionRecall(**kwargs), real, fake, batch).items()}


class FlattenFeatures(nn.Module):
    """Test extractor: identity on the flattened input, so the test controls the features."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, images):
        return images.flatten(1)


def as_images(features):
    """(N, D) features as (N, D, 1, 1) 'images' for FlattenFeatures."""
    return features[:, :, None, None]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("num_real,num_fake,block_size", [(61, 43, 8), (40, 75, 1024)])
def test_precision_recall_matches_brute_force(k, num_real, num_fake, block_size):
    generator = torch.Generator().manual_seed(num_real + k)
    real = torch.randn(num_real, 6, generator=generator)
    fake = 0.8 * torch.randn(num_fake, 6, generator=generator) + 0.8
    result = fed_precision_recall(real, fake, k=k, block_size=block_size)
    precision, recall = brute_force_precision_recall(real, fake, k)
    assert 0 < precision < 1 and 0 < recall < 1  # non-degenerate case
    assert result == pytest.approx({"precision": precision, "recall": recall}, abs=1e-12)


def test_precision_recall_matches_torch_fidelity():
    prc = pytest.importorskip("torch_fidelity.metric_prc")
    generator = torch.Generator().manual_seed(1)
    real, fake = torch.randn(90, 8, generator=generator), torch.randn(70, 8, generator=generator) + 0.5
    result = fed_precision_recall(real, fake, block_size=16)
    precision, recall = prc.calculate_precision_recall_full(fake.double(), real.double(), neighborhood=3)
    assert result == pytest.approx({"precision": precision, "recall": recall}, abs=1e-6)  # torch-fidelity averages in float32


def test_precision_recall_is_one_when_fake_equals_real():
    real = torch.randn(50, 5, generator=torch.Generator().manual_seed(2))
    assert fed_precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0}


def test_precision_drops_as_fakes_move_away():
    real = torch.randn(200, 4, generator=torch.Generator().manual_seed(3))
    shifts = [0.0, 0.5, 1.0, 2.0, 50.0]
    precisions = [fed_precision_recall(real, real + shift)["precision"] for shift in shifts]
    assert precisions[0] == 1.0 and precisions[-1] == 0.0
    assert all(a > b for a, b in itertools.pairwise(precisions[:-1]))


def test_precision_recall_ball_boundary_counts_as_inside():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])  # 3rd-neighbour radius of 0 is exactly 3
    fake = torch.tensor([[-3.0], [-3.5], [10.0], [11.0]])  # only -3 is inside, on the boundary of 0's ball
    assert fed_precision_recall(real, fake)["precision"] == 0.25


def test_precision_recall_keeps_real_features_across_reset_when_asked():
    generator = torch.Generator().manual_seed(4)
    real, fake = torch.randn(30, 3, generator=generator), torch.randn(30, 3, generator=generator)
    metric = PrecisionRecall(reset_real_features=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    first = {name: value.item() for name, value in metric.compute().items()}
    metric.reset()
    metric.update(fake, real=False)
    assert {name: value.item() for name, value in metric.compute().items()} == first
    metric.reset_real_features = True
    metric.reset()
    metric.update(fake, real=False)
    with pytest.raises(ValueError, match="more than k=3 real and fake feature vectors, got 0 real and 30 fake"):
        metric.compute()


def test_precision_recall_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be a positive int"):
        PrecisionRecall(k=0)
    with pytest.raises(ValueError, match=r"expects features of shape \(B, D\), got \(2, 3, 4\)"):
        PrecisionRecall().update(torch.zeros(2, 3, 4), real=True)


def gaussian_fid(mu1, sigma1, mu2, sigma2):
    """Closed-form Fréchet distance between two Gaussians (scipy sqrtm)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean))


def gaussian_samples(mu, sigma, n, seed):
    """n float64 samples of N(mu, sigma)."""
    generator = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(torch.as_tensor(sigma))
    return torch.as_tensor(mu) + torch.randn(n, len(mu), generator=generator, dtype=torch.float64) @ chol.T


MU_REAL, MU_FAKE = np.array([0.0, 0.0, 0.0, 0.0]), np.array([1.0, 0.5, 0.0, -0.5])
SIGMA_REAL = np.array([[2.0, 0.5, 0.0, 0.0], [0.5, 1.0, 0.3, 0.0], [0.0, 0.3, 1.5, 0.2], [0.0, 0.0, 0.2, 0.8]])
SIGMA_FAKE = np.diag([1.0, 2.0, 0.5, 1.2])


def fed_metrics(metrics, real, fake, batch=1000):
    """Feeds (N, D) features as images in batches and returns compute()."""
    for chunk in real.split(batch):
        metrics.update(as_images(chunk), real=True)
    for chunk in fake.split(batch):
        metrics.update(as_images(chunk), real=False)
    return metrics.compute()


def test_fid_matches_gaussian_closed_form():
    real = gaussian_samples(MU_REAL, SIGMA_REAL, 20000, seed=5)
    fake = gaussian_samples(MU_FAKE, SIGMA_FAKE, 20000, seed=6)
    result = fed_metrics(GenerativeMetrics(FlattenFeatures(4), precision_recall=False), real, fake)
    assert set(result) == {"fid"}
    exact = gaussian_fid(MU_REAL, SIGMA_REAL, MU_FAKE, SIGMA_FAKE)
    assert exact > 2.0
    assert result["fid"] == pytest.approx(exact, abs=0.1)
    real_np, fake_np = real.numpy(), fake.numpy()
    sample = gaussian_fid(real_np.mean(0), np.cov(real_np, rowvar=False), fake_np.mean(0), np.cov(fake_np, rowvar=False))
    assert result["fid"] == pytest.approx(sample, rel=1e-9)


def test_fid_reference_npz_equals_feeding_the_real_images(tmp_path):
    real = gaussian_samples(MU_REAL, SIGMA_REAL, 1200, seed=7)
    fake = gaussian_samples(MU_FAKE, SIGMA_FAKE, 900, seed=8)
    path = tmp_path / "ref.npz"
    np.savez(path, mu=real.mean(0).numpy(), sigma=np.cov(real.numpy(), rowvar=False))
    from_images = fed_metrics(GenerativeMetrics(FlattenFeatures(4)), real, fake)
    from_reference = fed_metrics(GenerativeMetrics(FlattenFeatures(4), fid_reference=path), real, fake)
    assert from_reference == pytest.approx(from_images, rel=1e-9)
    assert set(from_reference) == {"fid", "precision", "recall"}
    fid_only = GenerativeMetrics(FlattenFeatures(4), fid_reference=path, precision_recall=False)
    for chunk in fake.split(500):
        fid_only.update(as_images(chunk), real=False)
    assert fid_only.compute() == pytest.approx({"fid": from_images["fid"]}, rel=1e-9)
    with pytest.raises(ValueError, match="got real images but uses none"):
        fid_only.update(as_images(real[:4]), real=True)


def test_fid_reference_errors_name_the_file_and_expected_arrays(tmp_path):
    missing = tmp_path / "missing.npz"
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        GenerativeMetrics(FlattenFeatures(4), fid_reference=missing)
    no_sigma = tmp_path / "no_sigma.npz"
    np.savez(no_sigma, mu=np.zeros(4))
    with pytest.raises(KeyError, match=r"must hold arrays 'mu' and 'sigma', found \['mu'\]"):
        GenerativeMetrics(FlattenFeatures(4), fid_reference=no_sigma)
    wrong_dim = tmp_path / "wrong_dim.npz"
    np.savez(wrong_dim, mu=np.zeros(3), sigma=np.eye(3))
    expected = r"mu of shape \(4,\) and sigma of shape \(4, 4\) for 4-d features, got \(3,\) and \(3, 3\)"
    with pytest.raises(ValueError, match=expected):
        GenerativeMetrics(FlattenFeatures(4), fid_reference=wrong_dim)


def test_generative_metrics_precision_recall_and_reset():
    real = torch.randn(120, 5, generator=torch.Generator().manual_seed(9))
    metrics = GenerativeMetrics(FlattenFeatures(5), reset_real_features=False)
    result = fed_metrics(metrics, real, real.clone(), batch=50)
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert result["fid"] == pytest.approx(0.0, abs=1e-8)
    metrics.reset()  # reals kept, fakes dropped
    moved = real + 100.0
    for chunk in moved.split(50):
        metrics.update(as_images(chunk), real=False)
    result = metrics.compute()
    assert result["precision"] == 0.0 and result["recall"] == 0.0
    assert result["fid"] == pytest.approx(5 * 100.0**2, rel=1e-6)


def test_generative_metrics_updates_run_without_autocast():
    generator = torch.Generator().manual_seed(10)
    extractor = nn.Sequential(nn.Flatten(), nn.Linear(6, 6))
    extractor.num_features = 6
    real, fake = torch.randn(64, 6, generator=generator), torch.randn(64, 6, generator=generator) + 0.3
    plain = fed_metrics(GenerativeMetrics(extractor), real, fake)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert extractor(as_images(real)).dtype == torch.bfloat16  # autocast would change the features
        under_autocast = fed_metrics(GenerativeMetrics(extractor), real, fake)
    assert under_autocast == plain


def test_generative_metrics_requires_num_features():
    with pytest.raises(TypeError, match="needs an int attribute num_features"):
        GenerativeMetrics(nn.Flatten())


class TinyClassifier(nn.Module):
    """Digits-sized classifier with BatchNorm and Dropout, so train mode would change its output."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5))
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(self.body(x))


def test_classifier_features_are_penultimate_activations_in_eval_mode():
    classifier = TinyClassifier()
    with torch.no_grad():
        classifier.body[1].running_mean.uniform_(-0.5, 0.5)
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(11))
    extractor = ClassifierFeatures(classifier, head="fc").train()
    assert not extractor.training and not extractor.classifier.body[4].training
    assert extractor.num_features == 4 * 8 * 8
    classifier.eval()
    expected = classifier.body(images.float() / 127.5 - 1)
    assert torch.equal(extractor(images), expected)
    assert classifier(images.float()).shape == (5, 10)  # the caller's classifier keeps its head
    with pytest.raises(TypeError, match="expects uint8 images in 0..255, got dtype torch.float32"):
        extractor(images.float())
    with pytest.raises(TypeError, match="head must name the classifier's final nn.Linear, got 'body'"):
        ClassifierFeatures(classifier, head="body")


def test_inception_features_missing_weights_names_path_and_source(tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(FileNotFoundError) as error:
        inception_features(missing)
    message = str(error.value)
    assert str(missing) in message
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    assert "github.com/toshas/torch-fidelity/releases" in message


def test_inception_features_loads_local_weights_with_tf_resize(tmp_path, monkeypatch):
    weights, stand_in = write_random_inception_weights(tmp_path)
    net = inception_features(weights)
    assert torch.equal(net.fc.weight, stand_in.fc.weight)
    assert net.use_antialias is False and net.num_features == 2048 and not net.train(True).training
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        features = net(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32 and torch.isfinite(features).all()


def numpy_unbiased_mmd(x, y):
    """Unbiased MMD^2 with the cubic kernel (x.y / D + 1)^3, written out in numpy (float64)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, dim = len(x), x.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T / dim + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off_diagonal = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return off_diagonal - 2 * k_xy.sum() / m**2


def fed_kid(real, fake, batch=13, **kwargs):
    """KernelDistance fed in uneven batches."""
    return fed(KernelDistance(**kwargs), real, fake, batch).item()


def test_kid_full_sets_match_numpy_and_vanish_for_identical_sets():
    generator = torch.Generator().manual_seed(13)
    real, fake = torch.randn(60, 5, generator=generator), torch.randn(60, 5, generator=generator) + 0.7
    kid = fed_kid(real, fake, subsets=3, subset_size=1000)  # subsets capped at 60 rows: every subset is the full set
    assert kid == pytest.approx(numpy_unbiased_mmd(real, fake), rel=1e-12)
    assert kid > 0.1
    # Identical sets: the unbiased estimator is -(2 / m) (mean diagonal - mean off-diagonal kernel), 0 as m grows.
    for m in (60, 1000):
        x = torch.randn(m, 5, generator=generator)
        same = fed_kid(x, x.clone(), subsets=1, subset_size=m, batch=100)
        k = (x.double() @ x.double().T / 5 + 1) ** 3
        closed_form = -2 / m * (k.diagonal().mean() - (k.sum() - k.trace()) / (m * (m - 1))).item()
        assert same == pytest.approx(closed_form, rel=1e-9) and same == pytest.approx(numpy_unbiased_mmd(x, x), rel=1e-9)
    assert abs(same) < 0.02 * kid


def test_kid_subsets_are_seeded_and_each_matches_numpy():
    generator = torch.Generator().manual_seed(14)
    real, fake = torch.randn(50, 4, generator=generator), torch.randn(40, 4, generator=generator) * 1.5
    kid = fed_kid(real, fake, subsets=5, subset_size=20, seed=3)
    real, fake = canonical_order(real.double()), canonical_order(fake.double())  # the order subsets are drawn from
    draws = torch.Generator().manual_seed(3)
    expected = np.mean([numpy_unbiased_mmd(real[torch.randperm(50, generator=draws)[:20]],
                                           fake[torch.randperm(40, generator=draws)[:20]]) for _ in range(5)])
    assert kid == pytest.approx(expected, rel=1e-12)
    assert fed_kid(real, fake, subsets=5, subset_size=20, seed=3) == kid
    assert fed_kid(real, fake, subsets=5, subset_size=20, seed=4) != kid


def test_kid_two_samples_of_one_distribution_is_near_zero_and_shifts_raise_it():
    generator = torch.Generator().manual_seed(15)
    real, fake = torch.randn(400, 6, generator=generator), torch.randn(400, 6, generator=generator)
    kids = [fed_kid(real, fake + shift, subsets=20, subset_size=200) for shift in (0.0, 0.5, 1.0)]
    assert abs(kids[0]) < 0.02 and kids[0] < kids[1] < kids[2]


def test_kid_rejects_bad_arguments():
    with pytest.raises(ValueError, match="subset_size must be a positive int"):
        KernelDistance(subset_size=0)
    metric = KernelDistance()
    metric.update(torch.zeros(1, 3), real=True)
    metric.update(torch.zeros(5, 3), real=False)
    with pytest.raises(ValueError, match="at least 2 real and 2 fake feature vectors, got 1 and 5"):
        metric.compute()


def inception_score(logits, batch=7):
    """InceptionScore fed in uneven batches."""
    metric = InceptionScore()
    for chunk in logits.split(batch):
        metric.update(chunk)
    return metric.compute().item()


def test_inception_score_limits_and_numpy_formula():
    confident = 50.0 * torch.eye(10).repeat(3, 1)  # 30 near one-hot predictions, 3 per class
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-9)
    assert inception_score(confident[:, :4][torch.arange(30) % 10 < 4]) == pytest.approx(4.0, rel=1e-9)
    identical = torch.randn(1, 10, generator=torch.Generator().manual_seed(16)).repeat(25, 1)
    assert inception_score(identical) == pytest.approx(1.0, abs=1e-12)
    logits = torch.randn(40, 10, generator=torch.Generator().manual_seed(17), dtype=torch.float64) * 2
    p = torch.softmax(logits, dim=1).numpy()
    expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(axis=0))), axis=1)))
    assert inception_score(logits) == pytest.approx(expected, rel=1e-12)
    assert 1.0 < expected < 10.0


class LinearClassifierFeatures(nn.Module):
    """Test extractor with a classifier head: features = flattened input, class_logits = a fixed linear map."""

    def __init__(self, num_features, num_classes):
        super().__init__()
        self.num_features = num_features
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, images):
        return images.flatten(1)

    def class_logits(self, features):
        return self.head(features)


def test_generative_metrics_kid_and_inception_score_keep_the_real_features():
    generator = torch.Generator().manual_seed(18)
    real, fake = torch.randn(80, 5, generator=generator), torch.randn(60, 5, generator=generator) + 0.5
    extractor = LinearClassifierFeatures(5, 3)
    metrics = GenerativeMetrics(extractor, reset_real_features=False, kid_subsets=4, kid_subset_size=30, kid_seed=2,
                                inception_score=True)
    first = fed_metrics(metrics, real, fake, batch=25)
    assert set(first) == {"fid", "precision", "recall", "kid", "is"}
    assert first["kid"] == pytest.approx(fed_kid(real, fake, subsets=4, subset_size=30, seed=2), rel=1e-12)
    with torch.no_grad():
        assert first["is"] == pytest.approx(inception_score(extractor.head(fake)), rel=1e-6)
    metrics.reset()  # the real features stay; the fakes' and IS's state go
    for chunk in fake.split(25):
        metrics.update(as_images(chunk), real=False)
    assert metrics.compute() == pytest.approx(first, rel=1e-12)
    with pytest.raises(TypeError, match="inception_score needs a feature_extractor with class_logits"):
        GenerativeMetrics(FlattenFeatures(5), inception_score=True)


def test_classifier_features_class_logits_are_the_classifiers_logits():
    classifier = TinyClassifier().eval()
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(19))
    extractor = ClassifierFeatures(classifier, head="fc")
    with torch.no_grad():
        assert torch.allclose(extractor.class_logits(extractor(images)), classifier(images.float() / 127.5 - 1), atol=1e-6)


def test_grey_digits_reach_inception_as_three_equal_channels(tmp_path, monkeypatch):
    weights, _ = write_random_inception_weights(tmp_path)
    net = inception_features(weights)
    grey = GreyAsRGB(net)
    digits = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(20))
    with torch.no_grad():
        features = grey(digits)
        assert features.shape == (3, 2048) and grey.num_features == 2048
        assert torch.equal(features, net(digits.repeat(1, 3, 1, 1)))
        assert not torch.allclose(features[0], features[1])  # the images, not a constant, reach the network
    with pytest.raises(ValueError, match=r"expects grey images \(B, 1, H, W\), got \(3, 3, 8, 8\)"):
        grey(digits.repeat(1, 3, 1, 1))


@pytest.mark.parametrize("load", ["inception_features", "ADMInception"])
def test_an_inception_file_whose_pickle_runs_code_is_refused_unrun(tmp_path, load):
    from dg_lightning import evaluation, metrics

    marker, weights = tmp_path / "executed", tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": leaves_a_marker(marker)}, weights)
    reader = metrics.inception_features if load == "inception_features" else evaluation.ADMInception
    with pytest.raises(ValueError, match=r"weights-inception-2015-12-05-6726825d.pth: refused unread, its pickle would call posix.system"):
        reader(weights)
    assert not marker.exists()


def test_sliced_wasserstein_metric_is_the_distance_of_all_updates_and_keeps_its_reference():
    from dg_lightning.metrics import SlicedWasserstein, sliced_wasserstein

    reference = torch.randn(12, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    points = reference.flip(0) + torch.tensor([3.0, -4.0], dtype=torch.float64)  # the reference shifted by 5
    metric = SlicedWasserstein(reference, num_projections=64)
    for batch in points.split(5):
        metric.update(batch, real=False)
    # A translation by v moves every 1-D projection by <v, u>: SWD^2 = mean_u <v, u>^2, which is |v|^2 / 2 in 2-D
    # on average over u (and exactly sliced_wasserstein's own value).
    assert metric.compute() == {"swd": pytest.approx(sliced_wasserstein(points, reference, 64), rel=1e-12)}
    assert 0.5 * 5.0 < metric.compute()["swd"] < 5.0
    metric.reset()
    metric.update(reference, real=False)
    assert metric.compute() == {"swd": 0.0}  # the reference itself, after reset
    metric.reset()
    metric.update(points[:5], real=False)
    with pytest.raises(ValueError, match=r"as many fake points as reference points \(12, 2\), got \(5, 2\).*num_samples"):
        metric.compute()
    with pytest.raises(ValueError, match="fixed reference and takes no real points"):
        metric.update(points, real=True)
