"""Image-to-image translation (digits_i2i_g++): the source domain's degradation by hand, SDEdit against the closed-form
PF-ODE flow of Gaussian data (unguided, and guided from a wrong model by the exact log ratio: Theorem 1 from any start),
the toy's translation between mixtures by their exact scores, and a reduced run through every stage where DG weight 0
gives exactly the unguided translations."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from dg_lightning.config import ConfigError
from dg_lightning.pipelines import run
from dg_lightning.pipelines.digits_i2i import coarse_strokes, translate
from dg_lightning.sde import LinearVP

MEAN, WRONG_MEAN, STD, T0 = 0.3, -0.2, 0.4, 0.5  # target data N(MEAN, STD^2) per pixel in [-1, 1]; a wrong model's mean


def test_coarse_strokes_keeps_constants_and_averages_posterises_and_enlarges_blocks():
    constant = np.full((2, 8, 8, 1), 200, np.uint8)
    assert np.array_equal(coarse_strokes(constant, 2, 256, 0.7), constant)  # every step keeps a constant image
    checker = (np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)[None, ..., None]
    assert np.array_equal(coarse_strokes(checker, 2, 3, 0.0), np.full_like(checker, 128))  # block mean 1/2: level 1 of 0..2
    halves = np.zeros((1, 8, 8, 1), np.uint8)
    halves[:, :, :4] = 255
    blurred = coarse_strokes(halves, 2, 2, 1.0)[0, :, :, 0]
    assert np.array_equal(coarse_strokes(halves, 2, 2, 0.0), halves)
    assert (np.diff(blurred.astype(int), axis=1) <= 0).all() and blurred[:, 3].max() < 255 and blurred[:, 4].min() > 0
    assert np.array_equal(blurred, blurred[::-1])  # the same in every row


class GaussianDenoiser(nn.Module):
    """The exact denoiser of data N(mean, STD^2) per pixel: D(x; sigma) = mean + (x - mean) STD^2 / (STD^2 + sigma^2)."""

    def __init__(self, mean):
        super().__init__()
        self.mean, self.unused = mean, nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, class_labels=None):
        return self.mean + (x - self.mean) * STD**2 / (STD**2 + sigma.view(-1, 1, 1, 1) ** 2)


class ExactLogRatio(nn.Module):
    """The logit log(p_t / q_t) of the data N(MEAN, STD^2) against the model N(WRONG_MEAN, STD^2), diffused to VP time
    t: per pixel N(alpha m, alpha^2 STD^2 + sigma^2) in VP coordinates, summed over the pixels."""

    def forward(self, x_vp, t, class_labels=None):
        vp = LinearVP()
        alpha, sigma = (f(t).view(-1, 1, 1, 1) for f in (vp.alpha, vp.sigma))
        variance = alpha**2 * STD**2 + sigma**2
        return (((x_vp - alpha * WRONG_MEAN) ** 2 - (x_vp - alpha * MEAN) ** 2) / (2 * variance)).flatten(1).sum(1)


def closed_form(images, seed):
    """SDEdit of the data's own PF-ODE: x(sigma) - MEAN scales by sqrt(STD^2 + sigma^2), so the start x_s + sigma0 z
    ends at MEAN + (x_s + sigma0 z - MEAN) STD / sqrt(STD^2 + sigma0^2); uint8 NHWC (z: translate's per-sample z)."""
    from dg_lightning.seeds import SampleNoise, sample_seed
    from dg_lightning.shards import to_uint8

    sigma0 = float(LinearVP().edm_sigma_from_tau(torch.tensor(T0, dtype=torch.float64)))
    x_s = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1.0
    z = SampleNoise([sample_seed(seed, i) for i in range(len(images))]).randn(x_s.shape).double()
    x = MEAN + (x_s + sigma0 * z - MEAN) * STD / (STD**2 + sigma0**2) ** 0.5
    return to_uint8(x).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("guided", [False, True], ids=["exact model", "wrong model guided by the exact ratio"])
def test_sdedit_follows_the_closed_form_flow_of_gaussian_data(compose_cfg, guided):
    """200 Heun steps (100 from t0 = 0.5) keep the solver's error below half a uint8 level, so at most one level of
    rounding separates the translations from the closed form; the unguided wrong model ends far from it."""
    cfg = compose_cfg("experiment=digits_i2i_g++", "sampler.num_steps=200", "guidance.dg.weight=1",
                      "guidance.dg.weight_2nd=1", "guidance.dg.t_min=0", "guidance.dg.t_max=1", "guidance.dg.clip=null")
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    expected = closed_form(images, seed=7).astype(int)
    model, discriminator = (GaussianDenoiser(WRONG_MEAN), ExactLogRatio()) if guided else (GaussianDenoiser(MEAN), None)
    translated = translate(cfg, model, images, T0, 7, discriminator).astype(int)
    assert np.abs(translated - expected).max() <= 1
    if guided:
        assert np.abs(translate(cfg, model, images, T0, 7).astype(int) - expected).mean() > 20  # DG did the work


REDUCED = ["experiment=digits_i2i_g++", "score.max_steps=20", "discriminator.classifier.max_steps=20",
           "metrics.feature_steps=20", "trainer.max_epochs=1", "sampler.num_steps=4", "translation.t0=[0.3,0.7]",
           "metrics.kid.subset_size=100", "logger=csv"]


@pytest.mark.slow
def test_reduced_run_translates_at_every_t0_and_dg_weight_zero_is_sdedit(compose_cfg, tmp_path):
    metrics = run(compose_cfg(*REDUCED))
    names = ("fid", "precision", "recall", "kid", "is", "feature_l2", "label_agreement")
    assert set(metrics) == {f"{s}/{n}@t0={t0}" for s in ("eval", "eval_unguided") for n in names for t0 in (0.3, 0.7)} | {
        "sources/label_agreement"}
    assert all(0 <= metrics[f"{s}/label_agreement@t0={t0}"] <= 1 for s in ("eval", "eval_unguided") for t0 in (0.3, 0.7))
    # A longer start forgets more of the source.
    assert metrics["eval_unguided/feature_l2@t0=0.7"] > metrics["eval_unguided/feature_l2@t0=0.3"]
    out = tmp_path / "out"
    assert (out / "i2i.png").is_file() and json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    zero = run(compose_cfg(*REDUCED, "guidance.dg.weight=0"))
    assert all(zero[f"eval/{n}@t0={t0}"] == zero[f"eval_unguided/{n}@t0={t0}"] == metrics[f"eval_unguided/{n}@t0={t0}"]
               for n in names for t0 in (0.3, 0.7))
    cache = tmp_path / "logs" / "cache" / "digits_i2i_g++"
    assert [len(list(cache.glob(f"{stage}-*"))) for stage in ("generate", "train", "translate_unguided")] == [1, 1, 1]


@pytest.mark.parametrize("override, key", [("translation.t0=[0.2,1.5]", "translation.t0"),
                                           ("discriminator.select=best", "discriminator.select"),
                                           ("metrics.features=inception", "metrics.features")])
def test_bad_translation_settings_are_refused_before_any_compute(compose_cfg, tmp_path, override, key):
    (tmp_path / "inception.pth").write_bytes(b"")  # a path that exists: the check on the features comes first
    with pytest.raises(ConfigError) as error:
        run(compose_cfg("experiment=digits_i2i_g++", override, f"metrics.inception_path={tmp_path / 'inception.pth'}"))
    assert error.value.key == key
    assert not (tmp_path / "logs" / "cache").exists()


def test_toy_translation_between_mixtures_follows_the_exact_scores(compose_cfg):
    """SDEdit of the toy: points of a source mixture into the data mixture p by its exact denoiser. From t0 = 1 the
    source is forgotten (the translations are samples of p, within 2x the data-vs-data SWD floor); from t0 = 0.02 they
    stay within a few sigma(t0) of their sources; the wrong model q guided by the exact ratio d* (w1 = w2 = 1 on the
    whole window) translates as p's own denoiser does (Theorem 1 from any start)."""
    from mixtures import default_pair

    from dg_lightning.metrics import sliced_wasserstein
    from dg_lightning.pipelines.digits_i2i import sdedit
    from dg_lightning.toy import GaussianMixture, MixtureDenoiser, OptimalDiscriminator

    cfg = compose_cfg("experiment=toy2d", "sampler.num_steps=40", "guidance.dg.weight=1", "guidance.dg.weight_2nd=1",
                      "guidance.dg.t_min=0", "guidance.dg.t_max=1", "guidance.dg.clip=null", "+metrics.batch_size=500")
    data, model = default_pair()
    source = GaussianMixture(means=[[-2.0, 2.0], [2.0, -2.0]], covariances=[[[0.05, 0.0], [0.0, 0.05]]] * 2,
                             weights=[0.5, 0.5])
    n = 2000
    x_s = source.sample(n, torch.Generator().manual_seed(0)).float()
    reference = data.sample(n, torch.Generator().manual_seed(1)).float()
    floor = sum(sliced_wasserstein(data.sample(n, torch.Generator().manual_seed(2 + i)).float(), reference)
                for i in range(3)) / 3
    forgotten = sdedit(cfg, MixtureDenoiser(data), x_s, 1.0, 5)
    assert sliced_wasserstein(forgotten, reference) < 2.0 * floor
    assert sliced_wasserstein(x_s, reference) > 10.0 * floor
    sigma0 = float(LinearVP().edm_sigma_from_tau(torch.tensor(0.02)))
    assert (sdedit(cfg, MixtureDenoiser(data), x_s, 0.02, 5) - x_s).norm(dim=1).mean() < 3 * sigma0
    exact = sdedit(cfg, MixtureDenoiser(data), x_s[:300], 0.5, 5)
    guided = sdedit(cfg, MixtureDenoiser(model), x_s[:300], 0.5, 5, OptimalDiscriminator(data, model))
    unguided = sdedit(cfg, MixtureDenoiser(model), x_s[:300], 0.5, 5)
    assert (guided - exact).abs().max() < 1e-2 and (unguided - exact).abs().max() > 0.1
