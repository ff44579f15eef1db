"""Samplers with guidance: pure functions of (denoiser, latents, guidance). No Lightning.

`edm_sampler` is EDM's Algorithm 2 (Heun / Euler on the PF-ODE, optional churn) with Discriminator
Guidance as in the paper's Appendix D.1 (EDM-G++): the DG gradient enters the first-order slope with
weight w1 (dg_weight) and the second-order slope with weight w2 (dg_weight_2nd), inside the VP-time window of the
guidance. As in EDM's own sampler, the schedule is fitted to the network: its range clipped to the noise levels the
network supports and every noise level rounded to one the network takes (`network_sigmas`).
"""

import math

import torch

from dg_lightning.progress import track
from dg_lightning.sde import edm_sigma_steps
from dg_lightning.solvers import solver

BOOST_PERIOD = 5  # boosting: every 5th step, samples the discriminator calls fake get extra churn
BOOST_CHURN = 4.0  # ... with S_churn = 4
BOOST_WEIGHT_PERIOD = 2  # ... and on even steps their DG correction is doubled
BOOST_WEIGHT = 2.0


def network_sigmas(denoiser, sigma_min, sigma_max):
    """(sigma_min, sigma_max, round_sigma) fitted to the denoiser, as EDM's sampler does: [sigma_min, sigma_max] clipped
    to the network's [denoiser.sigma_min, denoiser.sigma_max], and its round_sigma (the supported noise level nearest
    to sigma). A score model without these (e.g. toy.MixtureDenoiser) takes every sigma > 0: no clipping, no rounding."""
    sigma_min = max(sigma_min, getattr(denoiser, "sigma_min", 0.0))
    sigma_max = min(sigma_max, getattr(denoiser, "sigma_max", math.inf))
    return sigma_min, sigma_max, getattr(denoiser, "round_sigma", lambda sigma: sigma)


def edm_slope(denoiser, x, sigma, class_labels=None, dtype=torch.float32):
    """EDM's PF-ODE slope dx/dsigma = (x - D(x; sigma)) / sigma = -sigma * score, for sigma per sample (B,)."""
    return (x - denoiser(x, sigma, class_labels).to(dtype)) / sigma.view((-1,) + (1,) * (x.ndim - 1))


@solver("heun", score="denoiser", solver="heun")
@solver("euler", score="denoiser", solver="euler")
def edm_sampler(
    denoiser,
    latents,
    class_labels=None,
    dg=None,
    dg_weight=0.0,
    dg_weight_2nd=0.0,
    dg_boosting=False,
    num_steps=18,
    sigma_min=0.002,
    sigma_max=80.0,
    rho=7.0,
    solver="heun",
    S_churn=0.0,
    S_min=0.0,
    S_max=float("inf"),
    S_noise=1.0,
    randn_like=torch.randn_like,
    dtype=torch.float32,
    progress=False,
):
    """Sample x ~ q (or the DG-refined model) from latents z ~ N(0, I): x_0 = sigma_max z, then num_steps PF-ODE steps.

    denoiser(x, sigma, class_labels) -> D(x; sigma), with sigma of shape (B,); its range and round_sigma, where it has
    them, fit the schedule (network_sigmas). Slopes (EDM coordinates):
      d = (x - D(x; sigma)) / sigma - w * sigma * grad_x log(d / (1 - d))   (score + w * DG correction)
    with w = dg_weight (w1 of Appendix D.1) on the first-order slope and dg_weight_2nd (w2) on Heun's correction; dg is
    the DiscriminatorGuidance term, dg_boosting the authors' adaptive boosting (BOOST_*).
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    batch = latents.shape[0]
    bshape = (-1,) + (1,) * (latents.ndim - 1)
    use_dg = dg is not None and (dg_weight != 0.0 or dg_weight_2nd != 0.0)
    sigma_min, sigma_max, round_sigma = network_sigmas(denoiser, sigma_min, sigma_max)
    steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho)
    sigmas_host = torch.cat([round_sigma(steps[:-1]), steps[-1:]]).to(dtype)  # t_0 > ... > t_{N-1} rounded, t_N = 0
    sigmas = sigmas_host.to(latents.device)
    sigmas_host = sigmas_host.tolist()
    x_next = latents.to(dtype) * sigmas[0]
    log_ratio = torch.full((batch,), float("inf"), device=latents.device)

    def score_slope(x, sigma):
        """The PF-ODE slope of the model at sigma per sample (B,)."""
        return edm_slope(denoiser, x, sigma, class_labels, dtype)

    for i in track(range(num_steps), "EDM sampling", enabled=progress):
        x_cur, t_cur, t_next = x_next, sigmas[i], sigmas[i + 1]
        # Churn with a per-sample gamma; boosting sets S_churn = 4 where the previous log ratio was < 0. Steps that
        # cannot churn keep t_hat = t_cur, known on the host (no device sync; the DG window is decided there).
        boost_churn = dg_boosting and i % BOOST_PERIOD == 0
        t_hat, x_hat, sigma_dg = t_cur.expand(batch), x_cur, sigmas_host[i]
        if (S_churn > 0 or boost_churn) and S_min <= sigmas_host[i] <= S_max:
            churn = torch.full((batch,), S_churn, dtype=dtype, device=latents.device)
            if boost_churn:
                churn = torch.where(log_ratio < 0, torch.full_like(churn, BOOST_CHURN), churn)
            gamma = torch.clamp(churn / num_steps, max=math.sqrt(2.0) - 1.0)
            if (gamma > 0).any():
                t_hat = sigma_dg = round_sigma(t_cur + gamma * t_cur)
                x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt().view(bshape) * S_noise * randn_like(x_cur)

        # Euler step with the DG correction of weight dg_weight (doubled by boosting on even steps where log ratio < 0).
        d_cur = score_slope(x_hat, t_hat)
        if use_dg and dg_weight != 0.0:
            log_ratio, grad = dg.edm(x_hat, sigma_dg, class_labels)
            boost = torch.ones_like(t_hat)
            if dg_boosting and i % BOOST_WEIGHT_PERIOD == 0:
                boost = torch.where(log_ratio < 0, torch.full_like(boost, BOOST_WEIGHT), boost)
            d_cur = d_cur - (dg_weight * boost * t_hat).view(bshape) * grad.to(dtype)
        x_next = x_hat + (t_next - t_hat).view(bshape) * d_cur

        # Heun correction with the DG correction of weight dg_weight_2nd.
        if solver == "heun" and i < num_steps - 1:
            t_next_b = t_next.expand(batch)
            d_prime = score_slope(x_next, t_next_b)
            if use_dg and dg_weight_2nd != 0.0:
                d_prime = d_prime - (dg_weight_2nd * t_next_b).view(bshape) * dg.edm(x_next, sigmas_host[i + 1], class_labels)[1].to(dtype)
            x_next = x_hat + (t_next - t_hat).view(bshape) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
