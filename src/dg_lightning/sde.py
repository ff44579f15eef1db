"""Noise processes and the maps between them. Plain torch, no Lightning.

Coordinates:
- LVP time t (or tau) in [0, 1]: x_t = alpha(t) x0 + sigma_vp(t) z, the discriminator's process.
- EDM sigma: x = x0 + sigma n, the EDM sampler's process ("weighted VE").
- Cosine VP time (ADM 64x64 classifiers) and discrete DDPM indices are reached through tau.
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearVP:
    """The linear VP SDE: beta(t) = beta0 + (beta1 - beta0) t on t in [0, 1]."""

    beta0: float = 0.1
    beta1: float = 20.0

    def beta(self, t):
        """beta(t) = beta0 + (beta1 - beta0) t."""
        return self.beta0 + (self.beta1 - self.beta0) * t

    def integral_beta(self, t):
        """I(t) = int_0^t beta = beta0 t + (beta1 - beta0) t^2 / 2."""
        return self.beta0 * t + 0.5 * (self.beta1 - self.beta0) * t**2

    def t_from_integral(self, integral):
        """The inverse of I: t = (-beta0 + sqrt(beta0^2 + 2 (beta1 - beta0) I)) / (beta1 - beta0)."""
        db = self.beta1 - self.beta0
        return (-self.beta0 + torch.sqrt(self.beta0**2 + 2.0 * db * integral)) / db

    def alpha(self, t):
        """Mean scale alpha(t) = exp(-I(t) / 2)."""
        return torch.exp(-0.5 * self.integral_beta(t))

    def sigma(self, t):
        """Noise std sigma_vp(t) = sqrt(1 - alpha(t)^2), computed stably for small t."""
        return torch.sqrt(-torch.expm1(-self.integral_beta(t)))

    def diffuse(self, x0, t, noise):
        """x_t = alpha(t) x0 + sigma_vp(t) z for a per-sample t of shape (B,)."""
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return self.alpha(t).view(shape) * x0 + self.sigma(t).view(shape) * noise

    # --- EDM sigma <-> VP tau (same signal-to-noise ratio, paper Eq. 8) ---
    def tau_from_edm_sigma(self, sigma):
        """tau(sigma): the VP time with alpha(tau) = 1 / sqrt(1 + sigma^2)."""
        return self.t_from_integral(torch.log1p(sigma**2))

    def edm_sigma_from_tau(self, tau):
        """sigma(tau) = sqrt(exp(I(tau)) - 1), the inverse of tau_from_edm_sigma."""
        return torch.sqrt(torch.expm1(self.integral_beta(tau)))

    @staticmethod
    def edm_to_vp_scale(sigma):
        """The factor that takes EDM coordinates x to VP coordinates: x_vp = x / sqrt(1 + sigma^2)."""
        return torch.rsqrt(1.0 + sigma**2)

    # --- importance-sampled training times ---
    def log_expm1_integral(self, t):
        """A(t) = log(exp(I(t)) - 1), the antiderivative of beta(t) / (1 - exp(-I(t)))."""
        integral = self.integral_beta(t)
        return integral + torch.log(-torch.expm1(-integral))

    def importance_cdf(self, t, t_min=1e-5):
        """CDF of the importance density on [t_min, 1]: (A(t) - A(t_min)) / Z."""
        a_min = self.log_expm1_integral(torch.as_tensor(t_min, dtype=torch.float64))
        z = self.log_expm1_integral(torch.tensor(1.0, dtype=torch.float64)) - a_min
        return (self.log_expm1_integral(t.double()) - a_min) / z

    def sample_time(self, n, t_min=1e-5, importance=True, generator=None, device=None):
        """Training times on [t_min, 1]: density prop. to g^2 / sigma_vp^2 (exact inverse CDF), or uniform."""
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        if not importance:
            return (t_min + (1.0 - t_min) * u).float()
        a_min = self.log_expm1_integral(torch.tensor(t_min, dtype=torch.float64, device=device))
        z = self.log_expm1_integral(torch.tensor(1.0, dtype=torch.float64, device=device)) - a_min
        integral = torch.nn.functional.softplus(z * u + a_min)  # I* = log(1 + exp(Z u + A(t_min)))
        return self.t_from_integral(integral).float()


def cosine_time_from_tau(tau, vp: LinearVP = LinearVP(), s=0.008):
    """Cosine-VP time with the same alpha as LVP time tau (ADM's 64x64 classifiers)."""
    f0_sqrt = math.cos((s / (1.0 + s)) * math.pi / 2.0)
    theta = torch.arccos((f0_sqrt * vp.alpha(tau)).clamp(-1.0, 1.0))
    return (1.0 + s) * (2.0 / math.pi) * theta - s


def edm_sigma_steps(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, device=None):
    """EDM's schedule sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    smax, smin = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (smax + i / max(num_steps - 1, 1) * (smin - smax)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64, device=device)])
