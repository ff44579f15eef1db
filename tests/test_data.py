"""The real/fake data module: balanced batches, labels, and diffusion on the fly."""

import numpy as np
import pytest
import torch

from dg_lightning.data import ArraySource, RealFakeDataModule, RealFakePairs


def test_batches_are_balanced_and_carry_labels_when_both_sources_have_them():
    real = ArraySource(np.zeros((10, 3), np.float32), labels=np.arange(10) % 3)
    fake = ArraySource(np.ones((7, 3), np.float32), labels=np.arange(7) % 3)
    module = RealFakeDataModule(real, fake, batch_size=8, conditional=True)
    batches = list(module.train_dataloader())
    assert len(batches) == 10 // 4  # one epoch = max(n_real, n_fake) pairs, drop_last
    for batch in batches:
        assert batch["is_real"].tolist() == [True] * 4 + [False] * 4
        assert (batch["x0"][:4] == 0).all() and (batch["x0"][4:] == 1).all()
        assert batch["class_labels"].shape == (8,)
    unlabelled = RealFakePairs(ArraySource(np.zeros((4, 3), np.float32)), fake).__getitems__([0, 1])
    assert "class_labels" not in unlabelled


def test_every_draw_gets_a_new_time_and_new_noise():
    real = ArraySource(np.zeros((64, 2), np.float32))
    module = RealFakeDataModule(real, real, batch_size=128, importance=False)
    batch = next(iter(module.train_dataloader()))
    first = module.diffuse(dict(batch))
    second = module.diffuse(dict(batch))
    assert not torch.equal(first["t"], second["t"]) and not torch.equal(first["x_t"], second["x_t"])
    # x0 = 0: x_t = sigma_vp(t) z, so x_t / sigma_vp(t) is standard normal.
    standardised = []
    for _ in range(40):
        diffused = module.diffuse(dict(batch))
        standardised.append(diffused["x_t"] / module.vp.sigma(diffused["t"])[:, None])
    draws = torch.cat(standardised)
    assert abs(draws.mean().item()) < 0.05 and abs(draws.std().item() - 1.0) < 0.05


def test_uint8_images_become_nchw_in_minus_one_one():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[0, ..., 0] = 255
    x0, labels = ArraySource(images).fetch([0, 1])
    assert x0.shape == (2, 3, 4, 4) and labels is None
    assert x0[0, 0].eq(1.0).all() and x0[0, 1:].eq(-1.0).all() and x0[1].eq(-1.0).all()


def test_bad_sources_fail_with_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        ArraySource(np.zeros((0, 2), np.float32), name="real data")
    with pytest.raises(ValueError, match="3 samples but 2 labels"):
        ArraySource(np.zeros((3, 2), np.float32), labels=[0, 1])
    unlabelled = ArraySource(np.zeros((3, 2), np.float32), name="fakes")
    with pytest.raises(ValueError, match="class labels.*fakes"):
        RealFakeDataModule(unlabelled, unlabelled, conditional=True)
    with pytest.raises(ValueError, match="even"):
        RealFakeDataModule(unlabelled, unlabelled, batch_size=7)
