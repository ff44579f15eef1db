"""Guidance terms against closed forms, and Theorem 1 with the optimal discriminator."""

import math

import pytest
import torch

from dg_lightning.guidance import (ClassifierGuidance, DiscriminatorGuidance, classifier_free_eps, log_ratio_from_logit,
                                   shifted_mean)
from dg_lightning.sde import LinearVP
from dg_lightning.toy import OptimalDiscriminator
from mixtures import default_pair, other_pair

vp = LinearVP()


class LinearLogit(torch.nn.Module):
    """logit = <a, x_vp> + b: its gradient w.r.t. x_vp is a, so grad_x = a / sqrt(1 + sigma^2)."""

    def __init__(self, a, b=0.0):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(a), b

    def forward(self, x_vp, tau, class_labels=None):
        return x_vp.flatten(1) @ self.a.flatten() + self.b


def test_log_ratio_is_the_logit_or_the_authors_clipped_sigmoid():
    logit = torch.linspace(-20, 20, 81)
    assert torch.equal(log_ratio_from_logit(logit), logit)
    clipped = log_ratio_from_logit(logit, clip=1e-5)
    bound = math.log((1 - 1e-5) / 1e-5)
    torch.testing.assert_close(clipped[logit.abs() < 10], logit[logit.abs() < 10], atol=1e-4, rtol=1e-4)
    assert clipped.max().item() == pytest.approx(bound, rel=1e-3) and clipped.min().item() == pytest.approx(-bound, rel=1e-3)
    # Saturated samples get a zero gradient with the clip, the true gradient without it.
    x = torch.tensor([15.0, 0.0], requires_grad=True)
    (grad,) = torch.autograd.grad(log_ratio_from_logit(x, clip=1e-5).sum(), x)
    assert grad.tolist() == pytest.approx([0.0, 1.0])


def test_edm_gradient_is_chain_rule_through_the_vp_scaling():
    torch.manual_seed(0)
    a = torch.randn(3, 4, 4)
    guidance = DiscriminatorGuidance(LinearLogit(a.clone()), t_min=0.0, t_max=1.0)
    x = torch.randn(5, 3, 4, 4)
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0, 70.0])
    ell, grad = guidance.edm(x, sigma)
    scale = 1.0 / torch.sqrt(1.0 + sigma**2)
    torch.testing.assert_close(grad, scale.view(-1, 1, 1, 1) * a.expand(5, -1, -1, -1))
    torch.testing.assert_close(ell, (x * scale.view(-1, 1, 1, 1)).flatten(1) @ a.flatten())
    assert all(p.grad is None for p in guidance.discriminator.parameters())  # only the input is differentiated


def test_window_is_decided_per_sample():
    guidance = DiscriminatorGuidance(LinearLogit(torch.ones(2)), t_min=0.01, t_max=0.5)
    sigma = vp.edm_sigma_from_tau(torch.tensor([0.005, 0.02, 0.3, 0.8], dtype=torch.float64)).float()
    ell, grad = guidance.edm(torch.ones(4, 2), sigma)
    inside = torch.tensor([False, True, True, False])
    assert torch.isinf(ell[~inside]).all() and torch.isfinite(ell[inside]).all()
    assert (grad[~inside] == 0).all() and (grad[inside] != 0).all()
    ell, grad = guidance.edm(torch.ones(2, 2), sigma[[0, 3]])  # nothing inside: no network call needed
    assert torch.isinf(ell).all() and (grad == 0).all()
    with pytest.raises(ValueError, match="t_min < t_max"):
        DiscriminatorGuidance(LinearLogit(torch.ones(2)), t_min=0.5, t_max=0.1)


def test_vp_coordinates_gradient_needs_no_scaling():
    a = torch.tensor([1.0, -2.0])
    guidance = DiscriminatorGuidance(LinearLogit(a.clone()), t_min=0.0)
    _, grad = guidance.vp_coordinates(torch.zeros(3, 2), torch.tensor([0.1, 0.5, 0.9]))
    torch.testing.assert_close(grad, a.expand(3, 2))


@pytest.mark.parametrize("pair", [default_pair, other_pair], ids=["default", "other"])
def test_theorem_1_corrected_score_equals_data_score(pair):
    data, model = pair()
    guidance = DiscriminatorGuidance(OptimalDiscriminator(data, model), t_min=0.0, t_max=1.0)
    torch.manual_seed(0)
    for sigma_value in [0.002, 0.05, 0.5, 2.0, 20.0, 80.0]:
        x = data.sample(200) + sigma_value * torch.randn(200, data.dim)
        sigma = torch.full((200,), sigma_value)
        _, grad = guidance.edm(x, sigma)
        corrected = model.score(x, 1.0, sigma.double()) + grad.double()
        expected = data.score(x, 1.0, sigma.double())
        scale = expected.abs().max().item() + 1.0
        assert (corrected - expected).abs().max().item() < 1e-4 * scale, sigma_value


def test_a_blind_discriminator_gives_no_correction():
    guidance = DiscriminatorGuidance(lambda x_vp, tau, y: torch.zeros(x_vp.shape[0]) + 0 * x_vp.sum(), t_min=0.0)
    _, grad = guidance.edm(torch.randn(4, 2), torch.full((4,), 1.0))
    assert (grad == 0).all()


def test_classifier_guidance_gradient_of_a_linear_softmax():
    torch.manual_seed(0)
    weight = torch.randn(5, 3)
    guidance = ClassifierGuidance(lambda x_vp, tau: x_vp @ weight.T, t_min=0.0)
    x, y = torch.randn(4, 3), torch.tensor([0, 2, 4, 1])
    _, grad = guidance.vp_coordinates(x, torch.full((4,), 0.5), y)
    probs = torch.softmax(x @ weight.T, dim=-1)
    torch.testing.assert_close(grad, weight[y] - probs @ weight)
    with pytest.raises(ValueError, match="class labels"):
        guidance.vp_coordinates(x, torch.full((4,), 0.5))
    # The logits come along (entropy-driven sampling).
    _, grad_again, logits = guidance.vp_coordinates(x, torch.full((4,), 0.5), y, with_aux=True)
    torch.testing.assert_close(logits, x @ weight.T)
    assert torch.equal(grad_again, grad) and not logits.requires_grad
    assert guidance.vp_coordinates(x, 0.5, y, with_aux=True)[2] is not None
    assert ClassifierGuidance(guidance.classifier, t_min=0.6).vp_coordinates(x, 0.5, y, with_aux=True)[2] is None


def test_ddpm_mean_shift_and_classifier_free_guidance():
    mean, variance = torch.zeros(2, 4), torch.full((2, 4), 0.5)
    g1, g2 = torch.ones(2, 4), torch.full((2, 4), 2.0)
    torch.testing.assert_close(shifted_mean(mean, variance, [(g1, 1.0), (g2, 0.5)]), torch.full((2, 4), 1.0))
    cond, uncond = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    eps = classifier_free_eps(cond, uncond, 3.0, guided_channels=3)
    assert eps[:, :3].eq(3.0).all() and eps[:, 3].eq(1.0).all()
    assert classifier_free_eps(cond, uncond, 3.0).eq(3.0).all()
