"""The adaptive RK45 PF-ODE samplers: Dormand-Prince 5(4) in pure torch, one step size for the whole batch.

`dormand_prince` integrates dx/dt = f(t, x) as scipy's solve_ivp(method="RK45") does on the flattened batch: the
embedded error estimate's RMS norm over every entry of the batch, scaled by atol + rtol max(|x|, |x_new|), the
standard controller (safety 0.9, step factor in [0.2, 10], no growth right after a rejection) and Hairer's first-step
heuristic. With the first-same-as-last stage its NFE is 2 + 6 (accepted + rejected steps).

The samplers solve the PF-ODE with DG's correction inside the drift (the paper's RK45 experiments on score_sde's ODE
sampler, rtol = atol = 1e-5), from VP time T down to eps: in EDM sigma coordinates for a denoiser (`rk45`), in LVP time
for a VP score model (`rk45_vp`).
"""

import math
from dataclasses import dataclass

import torch

from dg_lightning.progress import track
from dg_lightning.samplers import edm_slope
from dg_lightning.sde import LinearVP
from dg_lightning.solvers import solver

# Dormand & Prince (1980): the nodes c_i, the stage coefficients a_ij, the 5th-order weights of the step and the
# embedded 4th-order weights over the 7 stages (the 7th stage is f(t + h, x_new), the next step's first).
NODES = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
STAGES = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
          (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
          (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
WEIGHTS_5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
WEIGHTS_4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
ERROR_WEIGHTS = tuple(b5 - b4 for b5, b4 in zip(WEIGHTS_5, WEIGHTS_4))
ERROR_EXPONENT = -1 / 5  # the embedded estimate is 4th order: the local error is O(h^5)
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0  # the step-size controller (scipy's, Hairer's)
NFE_START, NFE_PER_STEP = 2, 6  # f(t0, x0) and the first-step heuristic's probe; 6 new stages per tried step
VP = LinearVP()


@dataclass(frozen=True)
class ODEState:
    """The integration after an accepted step: time t, state x, its slope f(t, x) (the next step's first stage), the
    next step size h, the evaluations of f so far (nfe), and the accepted and rejected steps so far."""

    t: float
    x: torch.Tensor
    slope: torch.Tensor
    h: float
    nfe: int
    accepted: int = 0
    rejected: int = 0


def rms(x):
    """The RMS of every entry of x (the controller's norm over the whole batch), in float64."""
    return torch.linalg.vector_norm(x, dtype=torch.float64).item() / math.sqrt(x.numel())


def _combine(weights, slopes):
    """sum_i w_i k_i over the nonzero weights."""
    return sum(w * k for w, k in zip(weights, slopes) if w != 0.0)


def first_step(f, t0, x0, slope0, t1, rtol, atol):
    """Hairer's initial step size (Solving ODEs I, II.4), as scipy's solve_ivp chooses it; evaluates f once."""
    span, direction = abs(t1 - t0), math.copysign(1.0, t1 - t0)
    scale = atol + rtol * x0.abs()
    d0, d1 = rms(x0 / scale), rms(slope0 / scale)
    h0 = min(1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1, span)
    d2 = rms((f(t0 + direction * h0, x0 + direction * h0 * slope0) - slope0) / scale) / h0
    h1 = max(1e-6, 1e-3 * h0) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1, span)


def dormand_prince_step(f, t, x, slope, h):
    """One Dormand-Prince step of size h from x at t with slope f(t, x): (x_new, f(t + h, x_new), the local error
    estimate); evaluates f 6 times."""
    slopes = [slope]
    for node, coefficients in zip(NODES[1:], STAGES[1:]):
        slopes.append(f(t + node * h, x + h * _combine(coefficients, slopes)))
    x_new = x + h * _combine(WEIGHTS_5, slopes)
    slopes.append(f(t + h, x_new))
    return x_new, slopes[-1], h * _combine(ERROR_WEIGHTS, slopes)


def _accepted_step(f, state, t1, rtol, atol):
    """The next accepted step from `state` towards t1: the controller shrinks the step until the error norm is < 1."""
    t, direction = state.t, math.copysign(1.0, t1 - state.t)
    min_step = 10 * abs(math.nextafter(t, direction * math.inf) - t)
    h_abs, nfe, rejected = max(state.h, min_step), state.nfe, state.rejected
    while h_abs >= min_step:
        t_new = t1 if direction * (t + direction * h_abs - t1) > 0 else t + direction * h_abs
        x_new, slope_new, error = dormand_prince_step(f, t, state.x, state.slope, t_new - t)
        nfe += NFE_PER_STEP
        norm = rms(error / (atol + rtol * torch.maximum(state.x.abs(), x_new.abs())))
        if not math.isfinite(norm):
            raise FloatingPointError(f"RK45: the ODE's drift is not finite between t = {t:.6g} and {t_new:.6g}; "
                                     "check the score model's (and the discriminator's) outputs there")
        if norm < 1:
            factor = MAX_FACTOR if norm == 0 else min(MAX_FACTOR, SAFETY * norm**ERROR_EXPONENT)
            factor = min(1.0, factor) if rejected > state.rejected else factor
            return ODEState(t_new, x_new, slope_new, abs(t_new - t) * factor, nfe, state.accepted + 1, rejected)
        h_abs = abs(t_new - t) * max(MIN_FACTOR, SAFETY * norm**ERROR_EXPONENT)
        rejected += 1
    raise FloatingPointError(f"RK45: the step size fell below {min_step:.3g} at t = {t:.6g}, the ODE is too stiff "
                             "there for these tolerances; loosen sampler.rtol and sampler.atol")


def dormand_prince(f, x, t0, t1, rtol=1e-5, atol=1e-5):
    """Yield the ODEState after each accepted step of adaptive RK45 on dx/dt = f(t, x) from x at t0 to t1 (either
    direction; t a float, x the whole batch, one step size for all of it)."""
    slope = f(t0, x)
    state = ODEState(t0, x, slope, first_step(f, t0, x, slope, t1, rtol, atol), nfe=NFE_START)
    while state.t != t1:
        state = _accepted_step(f, state, t1, rtol, atol)
        yield state


def solve(f, x, t0, t1, rtol=1e-5, atol=1e-5, progress=False):
    """The ODEState at t1 of dormand_prince (a Rich progress bar over its accepted steps when progress)."""
    state = None
    for state in track(dormand_prince(f, x, t0, t1, rtol, atol), "RK45 sampling", enabled=progress):
        pass
    return state


def _sigma(t):
    """EDM's sigma at VP time t (a float)."""
    return VP.edm_sigma_from_tau(torch.tensor(t, dtype=torch.float64)).item()


@solver("rk45", score="denoiser")
def rk45_sampler(denoiser, latents, class_labels=None, dg=None, dg_weight=0.0, rtol=1e-5, atol=1e-5, T=1.0, eps=1e-3,
                 denoise=False, randn_like=torch.randn_like, dtype=torch.float32, progress=False):
    """Sample x ~ q (or the DG-refined model) by RK45 on EDM's PF-ODE from x = sigma(T) z, z ~ N(0, I) (latents), down to
    sigma(eps), sigma(t) EDM's noise level at VP time t:
      dx/dsigma = (x - D(x; sigma)) / sigma - w * sigma * grad_x log(d / (1 - d))   (score + w * DG correction)
    with w = dg_weight and dg the DiscriminatorGuidance term; denoise: then x - sigma dx/dsigma at sigma(eps) (Tweedie's
    mean with the corrected score; EDM's last Euler step to sigma = 0). Deterministic: randn_like is not used.
    """
    batch, use_dg = latents.shape[0], dg is not None and dg_weight != 0.0
    sigma_start, sigma_end = _sigma(T), _sigma(eps)

    def slope(sigma, x):
        """The corrected PF-ODE slope at one sigma (a float) for the whole batch."""
        d = edm_slope(denoiser, x, torch.full((batch,), sigma, dtype=dtype, device=x.device), class_labels, dtype)
        return d - dg_weight * sigma * dg.edm(x, sigma, class_labels)[1].to(dtype) if use_dg else d

    x = solve(slope, latents.to(dtype) * sigma_start, sigma_start, sigma_end, rtol, atol, progress).x
    return x - sigma_end * slope(sigma_end, x) if denoise else x


@solver("rk45_vp", score="vp_score")
def rk45_vp_sampler(score_model, latents, class_labels=None, dg=None, dg_weight=0.0, rtol=1e-5, atol=1e-5, T=1.0,
                    eps=1e-3, denoise=False, randn_like=torch.randn_like, dtype=torch.float32, progress=False):
    """Sample x ~ q (or the DG-refined model) by RK45 on the LVP PF-ODE (score_sde's ODE sampler) from x(T) = z
    (latents) down to t = eps:
      dx/dt = -beta(t) / 2 * (x + s(x, t) + w * grad_x log(d / (1 - d)))   (score + w * DG correction)
    with s the VP score model, w = dg_weight and dg the DiscriminatorGuidance term; denoise: then Tweedie's mean
    (x + sigma_vp^2 (s + w grad)) / alpha at eps. Deterministic: randn_like is not used.
    """
    batch, use_dg = latents.shape[0], dg is not None and dg_weight != 0.0

    def corrected_score(t, x):
        """s(x, t) + w * grad_x log(d / (1 - d)) at one time t (a float) for the whole batch."""
        s = score_model(x, torch.full((batch,), t, dtype=dtype, device=x.device), class_labels).to(dtype)
        return s + dg_weight * dg.vp_coordinates(x, t, class_labels)[1].to(dtype) if use_dg else s

    def drift(t, x):
        """The corrected PF-ODE drift dx/dt."""
        return -0.5 * VP.beta(t) * (x + corrected_score(t, x))

    x = solve(drift, latents.to(dtype), T, eps, rtol, atol, progress).x
    if not denoise:
        return x
    t_end = torch.tensor(eps, dtype=torch.float64)
    return (x + VP.sigma(t_end).item() ** 2 * corrected_score(eps, x)) / VP.alpha(t_end).item()
