"""Guidance terms: gradients of per-sample log densities w.r.t. the sampler's input.

A guidance term has a per-sample log density L(x_vp, tau, y) in VP coordinates:
- Discriminator Guidance: L = log(d / (1 - d)), the discriminator's log density ratio;
- classifier guidance: L = log p(y | x_vp, tau).
It is evaluated in the sampler's own coordinates: EDM's x (x_vp = x / sqrt(1 + sigma^2), tau = tau(sigma))
or DDPM's x_k (already VP). Autograd through the scaling gives grad_x = grad_{x_vp} / sqrt(1 + sigma^2).
Only the input is differentiated (autograd.grad w.r.t. x): no parameter gradient is accumulated, so a
discriminator can be used for guidance in the middle of its own training (the sampling callback).
"""

import torch

from dg_lightning.sde import LinearVP


def log_ratio_from_logit(logit, clip=None):
    """log(d / (1 - d)) from the discriminator logit: exactly the logit, or (clip=eps) the authors' sigmoid + clip to [eps, 1 - eps]."""
    if clip is None:
        return logit
    d = torch.sigmoid(logit).clamp(clip, 1.0 - clip)
    return torch.log(d) - torch.log1p(-d)


def value_and_input_grad(log_density_and_aux, x):
    """(per-sample values L(x) (B,), grad_x of sum_b L, aux) for log_density_and_aux(x) = (L(x), aux), aux a by-product
    of the same forward (or None); no parameter is differentiated, nothing returned keeps a graph."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        value, aux = log_density_and_aux(x)
        (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad, None if aux is None else aux.detach()


class GradientGuidance:
    """A log density in VP coordinates, active per sample on the VP-time window [t_min, t_max]."""

    def __init__(self, t_min=0.0, t_max=1.0, vp: LinearVP = LinearVP()):
        if not 0.0 <= t_min < t_max:
            raise ValueError(f"guidance window needs 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max, self.vp = t_min, t_max, vp

    def log_density(self, x_vp, tau, class_labels):
        """Per-sample log density L(x_vp, tau, y) of shape (B,)."""
        raise NotImplementedError

    def log_density_and_aux(self, x_vp, tau, class_labels):
        """(L(x_vp, tau, y), a by-product of its forward that a sampler may use, or None)."""
        return self.log_density(x_vp, tau, class_labels), None

    def _value_and_grad(self, x, scale, tau, class_labels):
        """(L(x * scale, tau, y), its gradient w.r.t. x, aux) by autograd: x is the sampler's coordinates, x * scale
        VP's (scale None: x is already VP's)."""
        return value_and_input_grad(
            lambda x_: self.log_density_and_aux(x_ if scale is None else x_ * scale, tau, class_labels), x)

    def in_window(self, tau):
        """Per-sample mask: is tau inside [t_min, t_max]?"""
        return (tau >= self.t_min) & (tau <= self.t_max)

    def _masked(self, value, grad, tau):
        """Zero the gradient and set L = +inf outside the window (so 'L < 0' tests stay false there)."""
        inside = self.in_window(tau)
        value = torch.where(inside, value, torch.full_like(value, float("inf")))
        return value, grad * inside.view((-1,) + (1,) * (grad.ndim - 1)).to(grad.dtype)

    def _per_sample(self, value, x):
        """(per-sample float32 tensor (B,), whether no sample is in the window) for a noise level or VP time that is
        either a tensor (B,) or one float; for a float the window is decided on the host (no device sync)."""
        if isinstance(value, torch.Tensor):
            return value.to(torch.float32).expand(x.shape[0]), None
        return torch.full((x.shape[0],), float(value), device=x.device), torch.tensor([float(value)])

    def _outside(self, tau, host_tau):
        """True when no sample's tau is in the window (for one float tau, decided on the host in float32)."""
        return not bool(self.in_window(tau if host_tau is None else host_tau).any())

    def edm(self, x, sigma, class_labels=None):
        """(L, grad_x L) at EDM coordinates x with sigma per sample (B,) or one float for the whole batch."""
        sigma, host_sigma = self._per_sample(sigma, x)
        tau = self.vp.tau_from_edm_sigma(sigma)
        if self._outside(tau, None if host_sigma is None else self.vp.tau_from_edm_sigma(host_sigma)):
            return torch.full_like(sigma, float("inf")), torch.zeros_like(x)
        scale = self.vp.edm_to_vp_scale(sigma).view((-1,) + (1,) * (x.ndim - 1))
        value, grad, _ = self._value_and_grad(x.float(), scale, tau, class_labels)
        return self._masked(value, grad.to(x.dtype), tau)

    def vp_coordinates(self, x_vp, tau, class_labels=None, with_aux=False):
        """(L, grad L) at VP coordinates x_vp with VP time tau per sample (B,) or one float (the DDPM samplers); with_aux:
        (L, grad L, log_density_and_aux's by-product), the by-product None when no sample is in the window."""
        tau, host_tau = self._per_sample(tau, x_vp)
        if self._outside(tau, host_tau):
            outside = torch.full_like(tau, float("inf")), torch.zeros_like(x_vp)
            return (*outside, None) if with_aux else outside
        value, grad, aux = self._value_and_grad(x_vp.float(), None, tau, class_labels)
        masked = self._masked(value, grad.to(x_vp.dtype), tau)
        return (*masked, aux) if with_aux else masked


class DiscriminatorGuidance(GradientGuidance):
    """Discriminator Guidance: L = log(d / (1 - d)) of a discriminator returning logits (x_vp, tau, y) -> (B,)."""

    def __init__(self, discriminator, t_min=0.01, t_max=1.0, clip=None, vp: LinearVP = LinearVP()):
        super().__init__(t_min, t_max, vp)
        self.discriminator, self.clip = discriminator, clip

    def log_density(self, x_vp, tau, class_labels):
        """The log density ratio log(d / (1 - d)) = log(p_tau / q_tau) at the optimum."""
        return log_ratio_from_logit(self.discriminator(x_vp, tau, class_labels).reshape(-1), self.clip)


class ClassifierGuidance(GradientGuidance):
    """Classifier guidance: L = log softmax(classifier(x_vp, tau))[y] for a noise-aware classifier."""

    def __init__(self, classifier, t_min=0.0, t_max=1.0, vp: LinearVP = LinearVP()):
        super().__init__(t_min, t_max, vp)
        self.classifier = classifier

    def log_density(self, x_vp, tau, class_labels):
        """log p(y | x_vp, tau) for the given int64 class labels."""
        return self.log_density_and_aux(x_vp, tau, class_labels)[0]

    def log_density_and_aux(self, x_vp, tau, class_labels):
        """(log p(y | x_vp, tau), the classifier's logits (B, C): entropy-driven sampling's input) for int64 labels."""
        if class_labels is None:
            raise ValueError("classifier guidance needs class labels; sample with a conditional setting (num_classes > 0)")
        logits = self.classifier(x_vp, tau)
        return torch.log_softmax(logits, dim=-1).gather(1, class_labels.view(-1, 1)).squeeze(1), logits


def shifted_mean(mean, variance, grads_and_weights):
    """Guided DDPM posterior mean (paper Eq. 6): mu' = mu + Sigma_t * sum_i w_i grad L_i, with Sigma_t the model variance."""
    shift = sum(weight * grad for grad, weight in grads_and_weights)
    return mean + variance * shift


def classifier_free_eps(eps_cond, eps_uncond, scale, guided_channels=None):
    """eps_uncond + scale (eps_cond - eps_uncond), on the first `guided_channels` channels only (DiT guides 3 of 4)."""
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    if guided_channels is None:
        return guided
    return torch.cat([guided[:, :guided_channels], eps_cond[:, guided_channels:]], dim=1)
