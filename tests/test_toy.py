"""Gaussian mixtures: closed-form densities and scores, and config validation of the mixtures."""

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from dg_lightning.sde import LinearVP
from dg_lightning.toy import GaussianMixture, MixtureDenoiser, OptimalDiscriminator
from mixtures import default_pair, other_pair


@pytest.mark.parametrize("pair", [default_pair, other_pair], ids=["default", "other"])
def test_diffused_density_and_score_in_closed_form(pair):
    data, _ = pair()
    x = torch.randn(20, data.dim, dtype=torch.float64) * 2
    alpha, sigma = 0.7, 0.5
    expected = np.log(sum(
        w * multivariate_normal(alpha * m, alpha**2 * c + sigma**2 * np.eye(data.dim)).pdf(x.numpy())
        for w, m, c in zip(data.weights.numpy(), data.means.numpy(), data.covariances.numpy())))
    np.testing.assert_allclose(data.log_prob(x, alpha, sigma).numpy(), expected, rtol=1e-10)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(data.log_prob(x, alpha, sigma).sum(), x)
    torch.testing.assert_close(data.score(x.detach(), alpha, sigma), grad)


def test_samples_have_the_mixture_moments():
    data, _ = default_pair()
    x = data.sample(200000, torch.Generator().manual_seed(0)).double()
    mean = (data.weights[:, None] * data.means).sum(0)
    centred = data.means - mean
    cov = (data.weights[:, None, None] * (data.covariances + centred[:, :, None] * centred[:, None, :])).sum(0)
    torch.testing.assert_close(x.mean(0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.02, rtol=0)


def test_denoiser_is_tweedie_and_optimal_discriminator_is_the_log_ratio():
    data, model = default_pair()
    x, sigma = torch.randn(5, 2, dtype=torch.float64), torch.full((5,), 0.3, dtype=torch.float64)
    torch.testing.assert_close(MixtureDenoiser(model)(x, sigma), x + 0.09 * model.score(x, 1.0, sigma))
    tau = torch.full((5,), 0.2)
    vp = LinearVP()
    a, s = vp.alpha(tau.double()), vp.sigma(tau.double())
    expected = data.log_prob(x, a, s) - model.log_prob(x, a, s)
    torch.testing.assert_close(OptimalDiscriminator(data, model)(x, tau), expected)


def test_bad_mixtures_are_refused_with_the_key():
    with pytest.raises(ValueError, match=r"data.mixture.covariances\[1\].*not symmetric positive definite"):
        GaussianMixture([[0, 0], [1, 1]], [np.eye(2), [[1.0, 2.0], [2.0, 1.0]]], [0.5, 0.5], name="data.mixture")
    with pytest.raises(ValueError, match="weights must be positive and sum to 1"):
        GaussianMixture([[0, 0]], [np.eye(2)], [0.7])
    with pytest.raises(ValueError, match="covariances of shape"):
        GaussianMixture([[0, 0]], [np.eye(3)], [1.0])
