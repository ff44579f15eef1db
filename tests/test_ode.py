"""The adaptive RK45 PF-ODE samplers (dg_lightning.ode) against closed forms, scipy's RK45, EDM's Heun sampler and the
exact-guidance limit (Theorem 1), in float64.

Bounds: a solve at tolerance tol keeps each accepted step's local error near tol (1 + |x|), so its global error is
at most about steps * tol * (1 + max |x|), the solver's nominal bound (steps from the NFE: 2 + 6 per step).
"""

import math

import numpy as np
import pytest
import torch

from dg_lightning.config import ConfigError
from dg_lightning.guidance import DiscriminatorGuidance
from dg_lightning.metrics import sliced_wasserstein
from dg_lightning.ode import NFE_PER_STEP, NFE_START, VP, rk45_sampler, rk45_vp_sampler, solve
from dg_lightning.samplers import edm_sampler, edm_slope
from dg_lightning.sampling import build_sampler, check_sampler
from dg_lightning.toy import GaussianMixture, MixtureDenoiser, MixtureScore, OptimalDiscriminator
from mixtures import default_pair

F64 = torch.float64
COORDINATES = {"edm": (rk45_sampler, MixtureDenoiser), "vp": (rk45_vp_sampler, MixtureScore)}


class Counted(torch.nn.Module):
    """A score model that counts its calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args):
        self.calls += 1
        return self.model(*args)


def nominal_bound(steps, tol, x):
    """The solver's nominal global error: steps * tol * (1 + max |x|)."""
    return steps * tol * (1.0 + x.abs().max().item())


def latents(n, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("t0, t1", [(0.0, 3.0), (3.0, 0.5)])
def test_a_linear_ode_is_solved_to_the_tolerance_with_2_plus_6_evaluations_per_step(t0, t1):
    """dx/dt = A x: x(t1) = exp((t1 - t0) A) x(t0); A's symmetric part is -I / 2, a decaying rotation."""
    a = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=F64)
    x0, tol = latents(5), 1e-6
    state = solve(lambda t, x: x @ a.T, x0, t0, t1, tol, tol)
    exact = x0 @ torch.linalg.matrix_exp((t1 - t0) * a).T
    assert state.t == t1 and state.rejected == 0
    assert state.nfe == 2 + 6 * state.accepted
    assert (state.x - exact).abs().max().item() < nominal_bound(state.accepted, tol, exact)


def test_rejected_steps_cost_6_evaluations_each():
    """A stiff decay (rate 60) makes the controller reject steps; every tried step costs 6 evaluations."""
    a = torch.tensor([[-60.0, 0.0], [1.0, -1.0]], dtype=F64)
    state = solve(lambda t, x: x @ a.T, latents(5), 0.0, 1.0, 1e-6, 1e-6)
    assert state.rejected > 0
    assert state.nfe == NFE_START + NFE_PER_STEP * (state.accepted + state.rejected)


def test_a_drift_that_is_not_finite_is_an_error_naming_the_times():
    with pytest.raises(FloatingPointError, match="drift is not finite between t = "):
        solve(lambda t, x: x * (math.nan if t > 0.5 else 1.0), latents(3), 0.0, 1.0)


def test_the_same_steps_and_end_point_as_scipys_rk45():
    """scipy's solve_ivp(method='RK45') on the flattened batch: the same NFE, steps and end point, on the toy
    mixture's PF-ODE in EDM coordinates and on a stiff linear ODE (rejected steps)."""
    integrate = pytest.importorskip("scipy.integrate")
    _, model = default_pair()
    denoiser, x0 = MixtureDenoiser(model), 80.0 * latents(8)

    def pf_ode(sigma, x):
        return edm_slope(denoiser, x, torch.full((x.shape[0],), sigma, dtype=F64), dtype=F64)

    stiff = torch.tensor([[-60.0, 0.0], [1.0, -1.0]], dtype=F64)
    for f, t0, t1, tol in ((pf_ode, 80.0, 0.002, 1e-5), (lambda t, x: x @ stiff.T, 0.0, 1.0, 1e-6)):
        state = solve(f, x0, t0, t1, tol, tol)
        flat = integrate.solve_ivp(lambda t, y: f(t, torch.from_numpy(y).view(x0.shape)).numpy().ravel(), (t0, t1),
                                   x0.numpy().ravel(), method="RK45", rtol=tol, atol=tol)
        assert (state.nfe, state.accepted) == (flat.nfev, len(flat.t) - 1)
        np.testing.assert_allclose(state.x.numpy().ravel(), flat.y[:, -1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("coordinates", sorted(COORDINATES))
def test_the_gaussian_pf_ode_is_solved_in_edm_and_vp_coordinates(coordinates):
    """For x0 ~ N(mu, s^2 I): x_edm(sigma) = mu + sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma0^2) (x_edm(sigma0) - mu), and
    the VP state is x_vp(t) = alpha(t) x_edm(sigma(t)); both samplers run from VP time T = 1 to eps."""
    sampler, net = COORDINATES[coordinates]
    mu, s, tol, eps = torch.tensor([1.0, -2.0], dtype=F64), 0.5, 1e-6, 1e-3
    gaussian = GaussianMixture([mu.tolist()], [[[s**2, 0.0], [0.0, s**2]]], [1.0])
    z, model = latents(64), Counted(net(gaussian))
    x = sampler(model, z, T=1.0, eps=eps, rtol=tol, atol=tol, dtype=F64)
    (sigma0, sigma1), (alpha0, alpha1) = ([f(torch.tensor(t, dtype=F64)).item() for t in (1.0, eps)]
                                          for f in (VP.edm_sigma_from_tau, VP.alpha))
    start = sigma0 * z if coordinates == "edm" else z / alpha0
    exact = mu + math.sqrt(s**2 + sigma1**2) / math.sqrt(s**2 + sigma0**2) * (start - mu)
    exact = exact if coordinates == "edm" else alpha1 * exact
    steps, rest = divmod(model.calls - NFE_START, NFE_PER_STEP)
    assert rest == 0
    assert (x - exact).abs().max().item() < nominal_bound(steps, tol, exact)


@pytest.mark.parametrize("tol", [1e-5, 1e-7])
def test_the_toy_end_points_are_heuns_with_many_steps(tol):
    """RK45 from sigma 80 to 0.002 then Tweedie's mean (denoise: EDM's last Euler step to 0) against EDM's Heun
    sampler with 500 and 1000 steps, Richardson-extrapolated (Heun is 2nd order: its error falls 4x per doubling)."""
    _, model = default_pair()
    z, denoiser = latents(64), Counted(MixtureDenoiser(model))
    heun = [edm_sampler(MixtureDenoiser(model), z, num_steps=n, dtype=F64) for n in (500, 1000)]
    reference = heun[1] + (heun[1] - heun[0]) / 3
    T, eps = (VP.tau_from_edm_sigma(torch.tensor(sigma, dtype=F64)).item() for sigma in (80.0, 0.002))
    x = rk45_sampler(denoiser, z, T=T, eps=eps, denoise=True, rtol=tol, atol=tol, dtype=F64)
    steps = (denoiser.calls - NFE_START - 1) / NFE_PER_STEP  # denoise: one more evaluation
    assert steps == int(steps)
    assert (x - reference).abs().max().item() < nominal_bound(steps, tol, reference)


@pytest.mark.parametrize("coordinates", sorted(COORDINATES))
def test_theorem_1_the_guided_wrong_score_follows_the_data_pf_ode(coordinates):
    """With d* inside the drift (w = 1, window [0, 1]), the wrong model's ODE is the data's: the same end points up to the
    solvers' error (the controller bounds the batch's RMS error; the few points whose paths pass between modes amplify
    theirs: the median is held to 10 tol, 99% of them to 100 tol), and samples as close to the data as a second data
    sample."""
    sampler, net = COORDINATES[coordinates]
    data, model = default_pair()
    n, tol = 1000, 1e-5
    z = latents(n, seed=1)
    guidance = DiscriminatorGuidance(OptimalDiscriminator(data, model), t_min=0.0, t_max=1.0)
    guided = sampler(net(model), z, dg=guidance, dg_weight=1.0, rtol=tol, atol=tol, dtype=F64)
    exact = sampler(net(data), z, rtol=tol, atol=tol, dtype=F64)
    unguided = sampler(net(model), z, rtol=tol, atol=tol, dtype=F64)
    error = (guided - exact).abs().amax(dim=1)
    assert error.median().item() < 10 * tol and error.quantile(0.99).item() < 100 * tol
    reference = data.sample(n, torch.Generator().manual_seed(100))
    swd_floor = sum(sliced_wasserstein(data.sample(n, torch.Generator().manual_seed(101 + i)), reference) for i in range(3)) / 3
    assert sliced_wasserstein(guided.float(), reference) < 2.0 * swd_floor
    assert sliced_wasserstein(unguided.float(), reference) > 5.0 * swd_floor


def test_the_toy_config_samples_with_rk45_and_counts_its_nfe(compose_cfg):
    """sampler=rk45 on experiment=toy2d: check_sampler takes the toy's weight_2nd = weight (one weight on every slope)
    but refuses another weight_2nd, and build_sampler's sample_fn records the NFE of each batch."""
    cfg = compose_cfg("experiment=toy2d", "sampler=rk45")
    check_sampler(cfg)
    with pytest.raises(ConfigError, match="guidance.dg.weight_2nd.*or to guidance.dg.weight"):
        check_sampler(compose_cfg("experiment=toy2d", "sampler=rk45", "guidance.dg.weight_2nd=0.5"))
    data, model = default_pair()
    sample_fn = build_sampler(cfg, MixtureDenoiser(model), OptimalDiscriminator(data, model))
    z = latents(32).float()
    x = sample_fn(z, None)
    counted = Counted(MixtureDenoiser(model))
    expected = rk45_sampler(counted, z, dg=DiscriminatorGuidance(OptimalDiscriminator(data, model), t_min=0.01),
                            dg_weight=1.0, rtol=1e-5, atol=1e-5, T=1.0, eps=1e-3)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    assert sample_fn.nfe == [counted.calls] and (counted.calls - NFE_START) % NFE_PER_STEP == 0
    heun = build_sampler(compose_cfg("experiment=toy2d", "sampler.num_steps=5"), MixtureDenoiser(model))
    heun(z, None), heun(z[:4], None)
    assert heun.nfe == [9, 9]
