"""The discriminator objectives: each is minimised at the true log density ratio (paper Appendix B)."""

import lightning as L
import numpy as np
import pytest
import torch

from dg_lightning.data import ArraySource, RealFakeDataModule
from dg_lightning.module import OBJECTIVES, DiscriminatorModule


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
    net = FrozenPlusHead()
    frozen_before = net.frozen.weight.clone()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=150, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(DiscriminatorModule(net, lr=1e-2), RealFakeDataModule(real, fake, batch_size=64, t_min=1e-3, importance=False))
    assert torch.equal(net.frozen.weight, frozen_before)
    t = torch.full((4,), 0.01)
    with torch.no_grad():
        assert (net(torch.full((4, 2), 2.0), t) > 1).all() and (net(torch.full((4, 2), -2.0), t) < -1).all()
