"""Denoising score-matching losses of EDM (Karras et al. 2022, Table 1) for training a denoiser D(x; sigma).

Each loss draws one noise level per image, sigma ~ p_train, and returns the per-element loss
lambda(sigma) |D(y + sigma n; sigma) - y|^2 with n ~ N(0, I); average it for the training objective.
`net` is a preconditioner of `dg_lightning.nets.edm` (or any callable net(x, sigma, labels)).
"""

import torch

from dg_lightning.nets.edm import vp_sigma


class DenoisingLoss:
    """lambda(sigma) |D(y + sigma n; sigma) - y|^2 for sigma ~ p_train; subclasses give p_train and lambda."""

    def sample_sigma(self, n, device):
        """n noise levels from p_train, shaped [n, 1, 1, 1]."""
        raise NotImplementedError

    def weight(self, sigma):
        """The loss weight lambda(sigma)."""
        raise NotImplementedError

    def __call__(self, net, images, labels=None):
        sigma = self.sample_sigma(images.shape[0], images.device)
        noisy = images + torch.randn_like(images) * sigma
        return self.weight(sigma) * (net(noisy, sigma, labels) - images) ** 2


class EDMLoss(DenoisingLoss):
    """EDM: ln sigma ~ N(P_mean, P_std^2), lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

    lambda = 1 / c_out^2 of EDMPrecond, so the U-Net's effective target has unit weight at every sigma.
    """

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def sample_sigma(self, n, device):
        return (torch.randn(n, 1, 1, 1, device=device) * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class VPLoss(DenoisingLoss):
    """VP (Song et al. 2021): sigma = sigma_vp(t) with t ~ U(epsilon_t, 1), lambda(sigma) = 1 / sigma^2."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def sample_sigma(self, n, device):
        t = 1 - (1 - self.epsilon_t) * torch.rand(n, 1, 1, 1, device=device)
        return vp_sigma(t, self.beta_d, self.beta_min)

    def weight(self, sigma):
        return 1 / sigma**2


class VELoss(DenoisingLoss):
    """VE (Song et al. 2021): ln sigma ~ U(ln sigma_min, ln sigma_max), lambda(sigma) = 1 / sigma^2."""

    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def sample_sigma(self, n, device):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** torch.rand(n, 1, 1, 1, device=device)

    def weight(self, sigma):
        return 1 / sigma**2
