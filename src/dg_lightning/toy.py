"""The paper's toy 2-D experiment (§5.1): Gaussian mixtures whose diffused marginals are known in closed form.

Diffusing a mixture sum_k w_k N(mu_k, S_k) to VP time t gives sum_k w_k N(alpha mu_k, alpha^2 S_k + sigma_vp^2 I),
and in EDM coordinates (x = x0 + sigma n) sum_k w_k N(mu_k, S_k + sigma^2 I). So the exact score of a
deliberately wrong mixture q is a "pretrained model", and the optimal discriminator d* = p_t / (p_t + q_t)
is known exactly: its logit is log p_t - log q_t (Theorem 1).
"""

import math

import torch

from dg_lightning.sde import LinearVP


class GaussianMixture:
    """A Gaussian mixture with means (K, D), covariances (K, D, D) and weights (K,), float64."""

    def __init__(self, means, covariances, weights, name="mixture"):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covariances = torch.as_tensor(covariances, dtype=torch.float64)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        k, d = self.means.shape
        if self.covariances.shape != (k, d, d) or self.weights.shape != (k,):
            raise ValueError(
                f"{name}: means {tuple(self.means.shape)} need covariances of shape {(k, d, d)} and weights of shape {(k,)}, "
                f"got {tuple(self.covariances.shape)} and {tuple(self.weights.shape)}"
            )
        if (self.weights <= 0).any() or not math.isclose(self.weights.sum().item(), 1.0, rel_tol=1e-6):
            raise ValueError(f"{name}.weights must be positive and sum to 1, got {self.weights.tolist()}")
        for i, cov in enumerate(self.covariances):
            if not torch.allclose(cov, cov.T) or torch.linalg.eigvalsh(cov).min() <= 0:
                raise ValueError(f"{name}.covariances[{i}] = {cov.tolist()} is not symmetric positive definite; fix it in the config")
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.covariances)

    @property
    def dim(self):
        """Dimension D of the data."""
        return self.means.shape[1]

    def sample(self, n, generator=None):
        """n samples x0 ~ p, float32 (n, D)."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        chol = torch.linalg.cholesky(self.covariances)
        return (self.means[component] + (chol[component] @ z.unsqueeze(-1)).squeeze(-1)).float()

    def _components(self, x, alpha, sigma):
        """Per-sample per-component log w_k N(x; alpha mu_k, alpha^2 S_k + sigma^2 I) and precision @ (x - alpha mu_k).

        With S_k = U_k diag(lambda_k) U_k^T the diffused covariance is U_k diag(alpha^2 lambda_k + sigma^2) U_k^T.
        """
        x = x.double()
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        variances = alpha**2 * self.eigenvalues[None] + sigma**2  # (B or 1, K, D)
        diff = x[:, None, :] - alpha * self.means[None]  # (B, K, D)
        rotated = torch.einsum("kdj,bkd->bkj", self.eigenvectors, diff)  # U_k^T (x - mean)
        solved = torch.einsum("kdj,bkj->bkd", self.eigenvectors, rotated / variances)
        log_norm = -0.5 * ((rotated**2 / variances).sum(-1) + torch.log(variances).sum(-1) + self.dim * math.log(2 * math.pi))
        return torch.log(self.weights)[None] + log_norm, solved

    def log_prob(self, x, alpha=1.0, sigma=0.0):
        """log density at x of the mixture diffused to mean scale alpha and noise std sigma (scalars or (B,))."""
        log_terms, _ = self._components(x, alpha, sigma)
        return torch.logsumexp(log_terms, dim=1)

    def score(self, x, alpha=1.0, sigma=0.0):
        """grad_x log density of the diffused mixture: -sum_k r_k(x) precision_k (x - alpha mu_k), r_k the responsibilities."""
        log_terms, solved = self._components(x, alpha, sigma)
        responsibilities = torch.softmax(log_terms, dim=1)
        return -(responsibilities.unsqueeze(-1) * solved).sum(1)


class MixtureDenoiser(torch.nn.Module):
    """The exact EDM denoiser of a mixture: D(x; sigma) = x + sigma^2 grad log p_sigma(x)."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x, sigma, class_labels=None):
        """D(x; sigma) for EDM coordinates x (B, D) and per-sample sigma (B,)."""
        sigma = sigma.double().reshape(-1).expand(x.shape[0])
        return (x.double() + sigma[:, None] ** 2 * self.mixture.score(x, 1.0, sigma)).to(x.dtype)


class MixtureScore(torch.nn.Module):
    """The exact VP score of a mixture: grad log p_t(x_vp) of the mixture diffused to LVP time t."""

    def __init__(self, mixture: GaussianMixture, vp: LinearVP = LinearVP()):
        super().__init__()
        self.mixture, self.vp = mixture, vp

    def forward(self, x_vp, t, class_labels=None):
        """grad log p_t(x_vp) for VP coordinates x_vp (B, D) and per-sample LVP time t (B,)."""
        t = t.double().reshape(-1).expand(x_vp.shape[0])
        return self.mixture.score(x_vp, self.vp.alpha(t), self.vp.sigma(t)).to(x_vp.dtype)


class OptimalDiscriminator(torch.nn.Module):
    """The Bayes-optimal discriminator between diffused p (real) and q (fake): logit = log p_tau(x_vp) - log q_tau(x_vp)."""

    def __init__(self, data: GaussianMixture, model: GaussianMixture, vp: LinearVP = LinearVP()):
        super().__init__()
        self.data, self.model, self.vp = data, model, vp

    def forward(self, x_vp, tau, class_labels=None):
        """The exact log density ratio at VP coordinates x_vp and VP time tau (B,)."""
        tau = tau.double()
        alpha, sigma = self.vp.alpha(tau), self.vp.sigma(tau)
        log_ratio = self.data.log_prob(x_vp, alpha, sigma) - self.model.log_prob(x_vp, alpha, sigma)
        return log_ratio.to(x_vp.dtype)
