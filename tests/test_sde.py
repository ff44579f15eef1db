"""Noise processes against closed forms."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dg_lightning.sde import LinearVP, cosine_time_from_tau, edm_sigma_steps

vp = LinearVP()


def test_alpha_of_tau_of_sigma_is_one_over_sqrt_one_plus_sigma_squared():
    sigma = torch.logspace(-4, math.log10(80.0), 400, dtype=torch.float64)
    tau = vp.tau_from_edm_sigma(sigma)
    torch.testing.assert_close(vp.alpha(tau), 1.0 / torch.sqrt(1.0 + sigma**2), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(vp.edm_sigma_from_tau(tau), sigma, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(vp.edm_to_vp_scale(sigma), vp.alpha(tau), rtol=1e-12, atol=1e-14)


def test_reference_values_of_the_maps():
    assert vp.tau_from_edm_sigma(torch.tensor(80.0, dtype=torch.float64)).item() == pytest.approx(0.9335, abs=1e-4)
    assert vp.edm_sigma_from_tau(torch.tensor(0.01, dtype=torch.float64)).item() == pytest.approx(0.0447, abs=1e-4)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones_like(t))
    assert vp.alpha(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(math.exp(-(0.1 + 9.95) / 2))


def test_importance_normaliser_matches_spec():
    a_min = vp.log_expm1_integral(torch.tensor(1e-5, dtype=torch.float64)).item()
    z = vp.log_expm1_integral(torch.tensor(1.0, dtype=torch.float64)).item() - a_min
    assert a_min == pytest.approx(-13.8145, abs=1e-3)
    assert z == pytest.approx(23.8645, abs=1e-3)


def test_importance_sampled_times_follow_the_cdf_by_kolmogorov_smirnov():
    t = vp.sample_time(20000, t_min=1e-5, generator=torch.Generator().manual_seed(0)).double()
    cdf = lambda x: vp.importance_cdf(torch.as_tensor(x, dtype=torch.float64), 1e-5).numpy()  # noqa: E731
    assert stats.kstest(t.numpy(), cdf).pvalue > 1e-3
    assert float(t.median()) == pytest.approx(0.114, abs=0.01)
    assert t.min() >= 1e-5 and t.max() <= 1.0
    # The same test rejects a wrong distribution: uniform times are far from this CDF.
    u = vp.sample_time(20000, t_min=1e-5, importance=False, generator=torch.Generator().manual_seed(0)).double()
    assert stats.kstest(u.numpy(), cdf).pvalue < 1e-6
    assert stats.kstest(u.numpy(), stats.uniform(1e-5, 1 - 1e-5).cdf).pvalue > 1e-3


def test_importance_density_is_g2_over_sigma2():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    (density,) = torch.autograd.grad(vp.importance_cdf(t).sum(), t)
    beta = vp.beta0 + (vp.beta1 - vp.beta0) * t.detach()
    expected = beta / vp.sigma(t.detach()) ** 2
    ratio = density / expected
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))


def test_cosine_time_has_the_same_alpha_bar():
    s = 0.008
    tau = torch.linspace(0.001, 1.0, 200, dtype=torch.float64)
    t_cos = cosine_time_from_tau(tau, vp, s)
    f = lambda t: torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    alpha_bar_cos = f(t_cos) / f(torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(alpha_bar_cos, vp.alpha(tau) ** 2, rtol=1e-9, atol=1e-12)


def test_edm_schedule_and_default_window():
    sigmas = edm_sigma_steps(18)
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[17].item() == pytest.approx(0.002) and sigmas[18] == 0
    assert (sigmas[:-1].diff() < 0).all()
    inside = vp.tau_from_edm_sigma(sigmas[:-1]) >= 0.01
    assert inside.nonzero().flatten().tolist() == list(range(15))  # DG on for steps 0-14
    np.testing.assert_allclose(sigmas[15:18].numpy(), [0.0229, 0.0075, 0.002], atol=1e-4)
