"""The discriminator objectives: each is minimised at the true log density ratio (paper Appendix B)."""

import lightning as L
import numpy as np
import pytest
import torch

from dg_lightning.data import ArraySource, RealFakeDataModule
from dg_lightning.module import EMA, OBJECTIVES, DiscriminatorModule, LRFactor


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_population_minimiser_is_the_log_density_ratio(name):
    """At a point with real mass a and fake mass b, a L(l, real) + b L(l, fake) is minimised at l = log(a / b)."""
    objective = OBJECTIVES[name]()
    for a, b in [(0.7, 0.3), (0.2, 0.8), (0.5, 0.5)]:
        logit = torch.tensor(np.log(a / b), dtype=torch.float64, requires_grad=True)

        def risk(ell):
            return a * objective(ell, torch.tensor(True)) + b * objective(ell, torch.tensor(False))

        (grad,) = torch.autograd.grad(risk(logit), logit, create_graph=True)
        (curvature,) = torch.autograd.grad(grad, logit)
        assert abs(grad.item()) < 1e-12 and curvature.item() > 0
        assert risk(logit + 0.3).item() > risk(logit).item() < risk(logit - 0.3).item()


def test_bce_is_binary_cross_entropy_with_real_one_fake_zero():
    logit = torch.randn(10)
    is_real = torch.arange(10) < 5
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logit, is_real.float(), reduction="none")
    torch.testing.assert_close(OBJECTIVES["bce"]()(logit, is_real), expected)


class FrozenPlusHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(2, 4).requires_grad_(False)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x_t, t, class_labels=None):
        return self.head(self.frozen(x_t)).squeeze(-1)


def test_adam_on_trainable_parameters_with_paper_defaults():
    module = DiscriminatorModule(FrozenPlusHead())
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    group = optimizer.param_groups[0]
    assert group["lr"] == 3e-4 and group["weight_decay"] == 1e-7
    assert {id(p) for p in group["params"]} == {id(p) for p in module.discriminator.head.parameters()}
    with pytest.raises(ValueError, match="objective"):
        DiscriminatorModule(FrozenPlusHead(), objective="hinge")


def test_training_learns_a_separable_pair_and_leaves_the_frozen_part(tmp_path):
    """Real at +2, fake at -2 (in 2-D): after training, diffused reals at small t get positive logits."""
    real = ArraySource(np.full((256, 2), 2.0, dtype=np.float32))
    fake = ArraySource(np.full((256, 2), -2.0, dtype=np.float32))
    L.seed_everything(0, verbose=False)  # before the network: its frozen features must not depend on earlier tests
    net = FrozenPlusHead()
    frozen_before = net.frozen.weight.clone()
    trainer = L.Trainer(max_steps=150, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(DiscriminatorModule(net, lr=1e-2), RealFakeDataModule(real, fake, batch_size=64, t_min=1e-3, importance=False))
    assert torch.equal(net.frozen.weight, frozen_before)
    t = torch.full((4,), 0.01)
    with torch.no_grad():
        assert (net(torch.full((4, 2), 2.0), t) > 1).all() and (net(torch.full((4, 2), -2.0), t) < -1).all()


def test_ema_is_the_mean_of_the_first_iterates_then_the_exponential_average():
    """decay 0.75: beta_k = min(0.75, k / (k + 1)) makes the average after update 3 the mean of theta_0..theta_3; updates
    4..6 weight it by 0.75^3 and theta_4, theta_5, theta_6 by 0.25 * 0.75^2, 0.25 * 0.75, 0.25."""
    iterates = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0], [2.0, 2.0], [5.0, -1.0], [0.0, 3.0], [-4.0, 1.0]],
                            dtype=torch.float64)
    theta = torch.nn.Parameter(iterates[0].clone())
    ema = EMA([theta], decay=0.75)
    for iterate in iterates[1:]:
        theta.data.copy_(iterate)
        ema.update([theta])
    weights = torch.tensor([0.25 * 0.75**3] * 4 + [0.25 * 0.75**2, 0.25 * 0.75, 0.25], dtype=torch.float64)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-15)
    torch.testing.assert_close(ema.averages()[0], weights @ iterates, rtol=0, atol=1e-14)
    assert ema.num_updates.item() == 6


@pytest.mark.parametrize("schedule, step, factor", [
    ("constant", 7, 1.0), ("linear", 0, 1.0), ("linear", 25, 0.75), ("linear", 100, 0.0),
    ("cosine", 0, 1.0), ("cosine", 50, 0.5), ("cosine", 25, (1 + 2**-0.5) / 2), ("cosine", 100, 0.0),
])
def test_lr_factor_at_known_steps(schedule, step, factor):
    assert LRFactor(schedule, 100)(step) == pytest.approx(factor, abs=1e-15)


class Iterates(L.Callback):
    """The learning rate before each optimiser step and the trainable weights after it (the initial ones first)."""

    def __init__(self):
        self.lrs, self.weights = [], []

    def on_train_start(self, trainer, module):
        self.weights.append([p.detach().clone() for p in module.trainable()])

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.weights.append([p.detach().clone() for p in module.trainable()])


def test_training_with_cosine_decay_and_ema_guides_with_the_average_of_the_iterates(tmp_path):
    """Over 8 steps the learning rate is 1e-2 (1 + cos(pi s / 8)) / 2 at step s, and average_weights() leaves the
    trainable weights at the EMA of the recorded iterates (decay 0.5: the mean of theta_0, theta_1, then halving)."""
    real = ArraySource(np.full((64, 2), 2.0, dtype=np.float32))
    fake = ArraySource(np.full((64, 2), -2.0, dtype=np.float32))
    module, iterates = DiscriminatorModule(FrozenPlusHead(), lr=1e-2, lr_schedule="cosine", ema_decay=0.5), Iterates()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[iterates],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, RealFakeDataModule(real, fake, batch_size=32, t_min=1e-3, importance=False))
    assert iterates.lrs == pytest.approx([1e-2 * (1 + np.cos(np.pi * s / 8)) / 2 for s in range(8)], rel=1e-12)
    expected = [(w0 + w1) / 2 for w0, w1 in zip(*iterates.weights[:2])]
    for weights in iterates.weights[2:]:
        expected = [0.5 * e + 0.5 * w for e, w in zip(expected, weights)]
    module.average_weights()
    for p, e in zip(module.trainable(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)


def test_bad_schedule_and_decay_are_refused():
    with pytest.raises(ValueError, match="lr_schedule"):
        DiscriminatorModule(FrozenPlusHead(), lr_schedule="step")
    with pytest.raises(ValueError, match="ema_decay"):
        DiscriminatorModule(FrozenPlusHead(), ema_decay=1.0)
