"""The EDM sampler with DG against closed forms and the exact-guidance limit (Theorem 1)."""

import math

import pytest
import torch

from dg_lightning.accel import Accel, accelerate
from dg_lightning.guidance import DiscriminatorGuidance
from dg_lightning.metrics import sliced_wasserstein
from dg_lightning.nets import edm
from dg_lightning.samplers import edm_sampler
from dg_lightning.sde import edm_sigma_steps
from dg_lightning.toy import GaussianMixture, MixtureDenoiser, OptimalDiscriminator
from mixtures import default_pair, other_pair
from netutils import randomized_zeros


def test_heun_solves_the_gaussian_pf_ode_to_second_order():
    """For x0 ~ N(mu, s^2 I) the PF-ODE is linear: x(0) = mu + s / sqrt(s^2 + sigma_max^2) (x(sigma_max) - mu)."""
    mu, s = torch.tensor([1.0, -2.0]), 0.5
    gaussian = GaussianMixture([mu.tolist()], [[[s**2, 0.0], [0.0, s**2]]], [1.0])
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    expected = mu + s / math.sqrt(s**2 + 80.0**2) * (80.0 * z.double() - mu)

    def error(steps, solver):
        x = edm_sampler(MixtureDenoiser(gaussian), z, num_steps=steps, solver=solver, dtype=torch.float64)
        return (x - expected).abs().max().item()

    heun = [error(n, "heun") for n in (50, 100)]
    euler = [error(n, "euler") for n in (50, 100)]
    assert heun[1] < 5e-3
    assert heun[0] / heun[1] > 3.5  # second order
    assert 1.6 < euler[0] / euler[1] < 2.4  # first order


@pytest.mark.slow
@pytest.mark.parametrize("pair", [default_pair, other_pair], ids=["default", "other"])
def test_theorem_1_guided_sampler_follows_the_data_pf_ode(pair):
    """With d* and w1 = w2 = 1 on the whole window, the guided wrong model is the data's own sampler.

    40 steps keep the sampler's own discretisation error below the data-vs-data floor (at 18 steps it is
    about as large as the floor for these mixtures); the floor is the mean over three data-vs-data pairs.
    """
    data, model = pair()
    n, steps = 4000, 40
    z = torch.randn(n, data.dim, generator=torch.Generator().manual_seed(1))
    guidance = DiscriminatorGuidance(OptimalDiscriminator(data, model), t_min=0.0, t_max=1.0)
    guided = edm_sampler(MixtureDenoiser(model), z, dg=guidance, dg_weight=1.0, dg_weight_2nd=1.0, num_steps=steps)
    exact = edm_sampler(MixtureDenoiser(data), z[:300], num_steps=steps)
    unguided = edm_sampler(MixtureDenoiser(model), z, num_steps=steps)
    assert (guided[:300] - exact).abs().max().item() < 1e-2
    reference = data.sample(n, torch.Generator().manual_seed(100))
    swd_floor = sum(sliced_wasserstein(data.sample(n, torch.Generator().manual_seed(101 + i)), reference) for i in range(3)) / 3
    assert sliced_wasserstein(guided, reference) < 2.0 * swd_floor
    assert sliced_wasserstein(unguided, reference) > 5.0 * swd_floor


class LabelLogit(torch.nn.Module):
    """logit = <a, x_vp> + (5 if label == 1 else -5): a known gradient and a known sign per sample."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x_vp, tau, class_labels):
        return x_vp @ self.a + 10.0 * class_labels.float() - 5.0


class SpyDenoiser(torch.nn.Module):
    """D(x; sigma) = 0 (data at the origin), recording every sigma it is called with."""

    def __init__(self):
        super().__init__()
        self.sigmas = []

    def forward(self, x, sigma, class_labels=None):
        self.sigmas.append(sigma.clone())
        return torch.zeros_like(x)


def test_euler_step_with_dg_and_boosted_weight_in_closed_form():
    a, w1 = torch.tensor([1.0, -1.0]), 1.5
    guidance = DiscriminatorGuidance(LabelLogit(a), t_min=0.0)
    z, labels = torch.ones(2, 2), torch.tensor([0, 1])
    for boosting in (False, True):
        x = edm_sampler(SpyDenoiser(), z, labels, guidance, dg_weight=w1, dg_boosting=boosting, num_steps=1, solver="euler",
                        randn_like=torch.zeros_like, dtype=torch.float64)
        s0 = 80.0
        grad = a / math.sqrt(1 + s0**2)
        boost = torch.tensor([2.0 if boosting else 1.0, 1.0])  # label 0 has log ratio < 0: doubled on step 0
        d = (s0 * z.double()) / s0 - (w1 * boost * s0)[:, None] * grad
        torch.testing.assert_close(x, s0 * z.double() + (0.0 - s0) * d)


def test_boosting_churns_samples_called_fake_every_fifth_step():
    guidance = DiscriminatorGuidance(LabelLogit(torch.zeros(2)), t_min=0.0)
    spy, n = SpyDenoiser(), 6
    edm_sampler(spy, torch.ones(2, 2), torch.tensor([0, 1]), guidance, dg_weight=1.0, dg_boosting=True, num_steps=n, solver="euler",
                randn_like=torch.zeros_like, dtype=torch.float64)
    sigmas = edm_sigma_steps(n)
    gamma = min(4.0 / n, math.sqrt(2) - 1)
    assert spy.sigmas[0].tolist() == pytest.approx([80.0, 80.0])  # step 0: no previous log ratio yet
    assert spy.sigmas[5].tolist() == pytest.approx([sigmas[5].item() * (1 + gamma), sigmas[5].item()])
    assert spy.sigmas[4].tolist() == pytest.approx([sigmas[4].item()] * 2)


def test_dg_off_outside_the_window_and_with_zero_weight():
    data, model = default_pair()
    z = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    plain = edm_sampler(MixtureDenoiser(model), z)
    optimal = OptimalDiscriminator(data, model)
    zero_weight = edm_sampler(MixtureDenoiser(model), z, dg=DiscriminatorGuidance(optimal), dg_weight=0.0, dg_weight_2nd=0.0)
    empty_window = edm_sampler(MixtureDenoiser(model), z, dg=DiscriminatorGuidance(optimal, t_min=0.95, t_max=1.0), dg_weight=2.0)
    assert torch.equal(plain, zero_weight) and torch.equal(plain, empty_window)
    with pytest.raises(ValueError, match="solver"):
        edm_sampler(MixtureDenoiser(model), z, solver="rk4")


# --- the schedule fitted to an EDM network, as in EDM's own sampler ---

TINY_EDM = dict(img_resolution=8, img_channels=1, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[4], dropout=0.0)
EDM_NETS = {  # each preconditioner, and the noise range [sigma_min, sigma_max] it supports (EDM, Table 1)
    "vp": (lambda: edm.VPPrecond(model_type="SongUNet", **TINY_EDM),
           [math.sqrt(math.expm1(0.5 * 19.9 * t**2 + 0.1 * t)) for t in (1e-5, 1.0)]),
    "ve": (lambda: edm.VEPrecond(sigma_max=50.0, model_type="SongUNet", **TINY_EDM), [0.02, 50.0]),
    "iddpm": (lambda: edm.iDDPMPrecond(model_type="DhariwalUNet", **TINY_EDM), None),  # [u_{M-1}, u_0]
    "edm": (lambda: edm.EDMPrecond(model_type="DhariwalUNet", **TINY_EDM), [0.0, math.inf]),
}


def iddpm_levels(M=1000, C_1=0.001, C_2=0.008):
    """iDDPM's noise levels u_0 > ... > u_M = 0 in float64: u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1} / abar_j, C_1) - 1),
    abar_j = sin^2(pi j / (2 M (C_2 + 1)))."""
    abar = [math.sin(0.5 * math.pi * j / (M * (C_2 + 1))) ** 2 for j in range(M + 1)]
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(abar[j - 1] / abar[j], C_1) - 1)
    return u


def edm_noise_levels(supported, levels, num_steps, S_churn, S_min, S_max, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The noise levels at which EDM's Algorithm 2 calls the network, in float64: t_hat_0, t_1, t_hat_1, ..., t_hat_{N-1}.
    The schedule's range is clipped to the network's `supported` one, and every t_i and t_hat_i = t_i + gamma_i t_i is
    rounded to the nearest of the network's `levels` (None: any level)."""
    lo, hi = max(sigma_min, supported[0]), min(sigma_max, supported[1])
    nearest = (lambda s: s) if levels is None else (lambda s: min(levels, key=lambda u: abs(u - s)))
    t = [nearest((hi ** (1 / rho) + i / (num_steps - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho)
         for i in range(num_steps)]
    calls = []
    for i in range(num_steps):
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t[i] <= S_max else 0.0
        calls.append(nearest(t[i] + gamma * t[i]))
        if i < num_steps - 1:
            calls.append(t[i + 1])
    return calls


def no_wrapper(net):
    return net


def as_in_the_pipelines(net):
    """The EDM pipeline's index-label wrapper, run by the GPU fast path's wrapper."""
    return accelerate(edm.IndexLabels(net), Accel(channels_last=True))


@pytest.mark.parametrize("wrap", [no_wrapper, as_in_the_pipelines], ids=["net", "wrapped"])
@pytest.mark.parametrize("name", EDM_NETS)
def test_heun_calls_each_edm_network_at_edms_noise_levels(name, wrap):
    """Clipped to the network's range and rounded with its round_sigma, t_i and the churned t_hat_i alike."""
    build, supported = EDM_NETS[name]
    net = randomized_zeros(build(), scale=0.05).eval().requires_grad_(False)
    levels = iddpm_levels() if name == "iddpm" else None
    supported = supported or [levels[-2], levels[0]]
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    settings = dict(num_steps=6, S_churn=1.2, S_min=0.05, S_max=10.0)  # churn (gamma = 0.2) on steps i = 2, 3, 4 only
    edm_sampler(wrap(net), torch.ones(2, 1, 8, 8), randn_like=torch.zeros_like, dtype=torch.float64, **settings)

    expected = torch.tensor(edm_noise_levels(supported, levels, **settings), dtype=torch.float64)
    seen = torch.stack(seen).reshape(len(seen), 2)
    assert torch.equal(seen[:, 0], seen[:, 1])
    torch.testing.assert_close(seen[:, 0], expected, rtol=1e-6, atol=0.0)
    if name == "iddpm":
        assert torch.isin(seen.float(), net.u).all()
