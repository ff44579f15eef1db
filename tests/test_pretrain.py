"""Pretraining modules: EMA, EDM score model, noise-aware classifier, clean loader (dg_lightning.pretrain)."""

import copy
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dg_lightning.data import ArraySource
from dg_lightning.nets.adm import EncoderUNet
from dg_lightning.nets.edm import EDMPrecond
from dg_lightning.pretrain import (NoisyClassifierModule, ScoreModule, clean_loader, ema_decay, ema_update)
from dg_lightning.score_loss import EDMLoss
from dg_lightning.sde import LinearVP


def tiny_denoiser(label_dim=0):
    """An EDM-preconditioned DDPM++ at 1x8x8, one level of width 16, no dropout."""
    return EDMPrecond(8, 1, label_dim=label_dim, model_type="SongUNet", model_channels=16, channel_mult=(1,),
                      num_blocks=1, attn_resolutions=(), dropout=0.0)


def tiny_classifier(num_outputs=2):
    """An ADM EncoderUNet at 1x8x8, one level of width 32, attention pool to num_outputs logits."""
    return EncoderUNet(image_size=8, in_channels=1, model_channels=32, out_channels=num_outputs, num_res_blocks=1,
                       attention_resolutions=(), channel_mult=(1,), num_head_channels=32)


def half_images(n):
    """n uint8 NHWC 8x8 images, the left half white (label 0) or the right half white (label 1), alternating."""
    labels = np.arange(n) % 2
    left = np.zeros((8, 8, 1), np.uint8)
    left[:, :4] = 255
    return np.where(labels[:, None, None, None] == 0, left, left[:, ::-1]), labels


def fit(module, source, steps, batch_size, tmp_path, callbacks=()):
    """Train module on source for a number of optimiser steps on the CPU; returns the trainer."""
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=list(callbacks))
    trainer.fit(module, clean_loader(source, batch_size))
    return trainer


# --- EMA ---

class Toy(torch.nn.Module):
    """One scalar parameter and one buffer."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.register_buffer("count", torch.zeros(()))


def test_ema_update_matches_closed_form_after_k_steps():
    net, decay, k = Toy(), 0.8, 7
    ema = copy.deepcopy(net)
    with torch.no_grad():
        ema.weight.fill_(3.0)
    for i in range(1, k + 1):
        with torch.no_grad():
            net.weight.fill_(float(i))
            net.count.fill_(float(i))
        ema_update(ema, net, decay)
    expected = decay**k * 3.0 + (1 - decay) * sum(decay ** (k - i) * i for i in range(1, k + 1))
    assert ema.weight.item() == pytest.approx(expected, rel=1e-6)
    assert ema.count.item() == k


def test_ema_decay_halves_the_weight_of_the_past_every_halflife():
    batch, halflife = 16, 4000
    assert ema_decay(batch, 10**9, halflife) ** (halflife / batch) == pytest.approx(0.5)
    assert ema_decay(batch, 10**9, halflife, rampup_ratio=0.05) == pytest.approx(0.5 ** (batch / halflife))
    assert ema_decay(batch, 20_000, halflife, rampup_ratio=0.05) == pytest.approx(0.5 ** (batch / 1000))
    assert ema_decay(batch, 0, halflife, rampup_ratio=0.05) == 0.0


class RecordParameters(L.Callback):
    """Keeps a copy of the parameters of the module's `network` (net or ema) that callbacks see after every optimiser
    step."""

    def __init__(self, network="net"):
        self.network, self.steps = network, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append([p.detach().clone() for p in getattr(module, self.network).parameters()])


def fit_recorded(module, source, steps, batch_size, tmp_path):
    """Train module like fit and return [initial parameters, parameters after step 1, ...]."""
    record = RecordParameters()
    record.steps.append([p.detach().clone() for p in module.net.parameters()])
    fit(module, source, steps, batch_size, tmp_path, [record])
    return record.steps


def assert_ema_is_mean(module, first, second):
    """The EMA parameters are (first + second) / 2, and the two differ."""
    for p0, p1, p_ema in zip(first, second, module.ema_network().parameters()):
        torch.testing.assert_close(p_ema, 0.5 * (p0 + p1))
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(first, second))


def test_score_module_ema_decay_follows_the_images_seen(tmp_path):
    """Half-life = one batch gives decay 1/2 at every step; a ramp-up ratio of 1 caps the half-life at the images seen
    before the step: decay 0 (a copy) at step 1, 1/2 at step 2 (8 images seen, batch 8)."""
    images, labels = half_images(8)
    source = ArraySource(images, labels)
    torch.manual_seed(0)
    halved = ScoreModule(tiny_denoiser(), EDMLoss(), ema_halflife_images=8, ema_rampup_ratio=None)
    initial, after_1 = fit_recorded(halved, source, 1, 8, tmp_path)
    assert_ema_is_mean(halved, initial, after_1)

    ramped = ScoreModule(tiny_denoiser(), EDMLoss(), ema_halflife_images=10**6, ema_rampup_ratio=1.0)
    _, after_1, after_2 = fit_recorded(ramped, source, 2, 8, tmp_path)
    assert_ema_is_mean(ramped, after_1, after_2)
    assert not ramped.ema_network().training and ramped.net.training


def test_score_module_updates_the_ema_before_the_callbacks_see_the_step(tmp_path):
    """A checkpoint saved by a callback after step k (ModelCheckpoint every n steps) must hold the EMA updated with
    step k, or a run resumed from it is one EMA update short."""
    images, labels = half_images(8)
    module = ScoreModule(tiny_denoiser(), EDMLoss(), ema_halflife_images=8, ema_rampup_ratio=None)
    record = RecordParameters("ema")
    fit(module, ArraySource(images, labels), 2, 8, tmp_path, [record])
    after_1, after_2 = record.steps
    assert any(not torch.equal(p1, p2) for p1, p2 in zip(after_1, after_2))
    for seen, final in zip(after_2, module.ema_network().parameters()):
        assert torch.equal(seen, final)


# --- score model ---

def denoiser_rms_error(net, constants, sigma, n=256):
    """RMS of D(x; sigma) - x0 over x = x0 + sigma n, where class k has the constant image constants[k]."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(n) % len(constants)
    x0 = constants[labels].view(-1, 1, 1, 1).expand(n, 1, 8, 8)
    x = x0 + sigma * torch.randn(x0.shape, generator=generator)
    with torch.no_grad():
        denoised = net(x, torch.full((n,), sigma), F.one_hot(labels, len(constants)).float())
    return ((denoised - x0) ** 2).mean().sqrt().item()


def test_score_module_learns_the_constant_images_of_each_class(tmp_path):
    """Each class is one constant image c_k, so the exact denoiser is D(x; sigma, k) = c_k for every x and sigma.
    At initialisation D is c_skip x = x / 5 at sigma = 1 (RMS error ~0.45); training must bring it near c_k."""
    L.seed_everything(0)
    levels = np.array([64, 191], np.uint8)
    labels = np.arange(32) % 2
    source = ArraySource(np.broadcast_to(levels[labels][:, None, None, None], (32, 8, 8, 1)).copy(), labels)
    constants = torch.tensor(levels / 127.5 - 1.0, dtype=torch.float32)
    module = ScoreModule(tiny_denoiser(label_dim=2), EDMLoss(), lr=5e-3, warmup_steps=10)

    def mean_loss():
        torch.manual_seed(2)
        x0, y = source.fetch(np.arange(32))
        with torch.no_grad():
            return module.loss(module.net, x0, F.one_hot(y, 2).float()).mean().item()

    before_loss = mean_loss()
    before = denoiser_rms_error(module.net, constants, 1.0)
    fit(module, source, 100, 16, tmp_path)
    assert before > 0.4
    assert mean_loss() < 0.2 * before_loss
    assert denoiser_rms_error(module.net, constants, 1.0) < 0.15
    assert denoiser_rms_error(module.ema_network(), constants, 1.0) < 0.15
    # the labels matter: with the other class's one-hot label the output stays near the wrong constant
    assert denoiser_rms_error(module.net, constants.flip(0), 1.0) > 0.6


def test_score_module_warms_up_the_learning_rate_linearly():
    module = ScoreModule(tiny_denoiser(), EDMLoss(), lr=1e-3, warmup_steps=4)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert config["lr_scheduler"]["interval"] == "step"
    assert isinstance(ScoreModule(tiny_denoiser(), EDMLoss()).configure_optimizers(), torch.optim.Adam)


def test_conditional_score_module_needs_labels():
    module = ScoreModule(tiny_denoiser(label_dim=3), EDMLoss())
    with pytest.raises(ValueError, match="label_dim=3"):
        module.class_labels({"x0": torch.zeros(2, 1, 8, 8)})
    one_hot = module.class_labels({"x0": torch.zeros(2, 1, 8, 8), "class_labels": torch.tensor([2, 0])})
    assert torch.equal(one_hot, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    assert ScoreModule(tiny_denoiser(), EDMLoss()).class_labels({"class_labels": torch.tensor([1])}) is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=0.0), "lr must be > 0"),
    (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
    (dict(ema_halflife_images=0), "ema_halflife_images must be > 0"),
    (dict(ema_rampup_ratio=0.0), "ema_rampup_ratio must be > 0 or None"),
])
def test_score_module_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScoreModule(tiny_denoiser(), EDMLoss(), **kwargs)


# --- noise-aware classifier ---

def test_classifier_accuracy_is_high_at_small_t_and_at_chance_at_t_1(tmp_path):
    """At t = 1, alpha = e^-5.03 and the best possible accuracy is Phi(alpha |x0_1 - x0_0| / (2 sigma)) = 0.52;
    a classifier trained on every t must also be calibrated there (cross-entropy ~ log 2, not overconfident)."""
    L.seed_everything(0)
    images, labels = half_images(64)
    source = ArraySource(images, labels)
    module = NoisyClassifierModule(tiny_classifier(), lr=2e-3)
    trainer = fit(module, source, 60, 32, tmp_path)
    assert 0.0 <= trainer.callback_metrics["train/accuracy"] <= 1.0

    vp, n = LinearVP(), 2000
    x0, y = source.fetch(np.arange(n) % 64)
    generator = torch.Generator().manual_seed(0)
    module.eval()

    def accuracy_and_loss(time):
        t = torch.full((n,), time)
        with torch.no_grad():
            logits = module(vp.diffuse(x0, t, torch.randn(x0.shape, generator=generator)), t)
        return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()

    assert accuracy_and_loss(0.05)[0] > 0.98
    distance = (x0[0] - x0[1]).norm()
    t1 = torch.tensor(1.0)
    bayes = 0.5 * (1 + math.erf(float(vp.alpha(t1) * distance / (2 * vp.sigma(t1))) / math.sqrt(2)))
    assert bayes < 0.53
    accuracy, loss = accuracy_and_loss(1.0)
    assert 0.46 < accuracy < bayes + 0.03
    assert loss == pytest.approx(math.log(2), abs=0.05)


class SpyClassifier(torch.nn.Module):
    """Records the inputs and timesteps it is called with; logits from a linear map of the pixel mean."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(1, 2)
        self.calls = []

    def forward(self, x, timesteps):
        self.calls.append((x.detach().clone(), timesteps.detach().clone()))
        return self.linear(x.mean(dim=(1, 2, 3))[:, None])


@pytest.mark.parametrize("importance", [True, False])
def test_classifier_sees_lvp_diffused_inputs_at_timesteps_999_t(tmp_path, importance):
    """All images are one x0, so z = (x_t - alpha(t) x0) / sigma(t) with t = timesteps / 999 must be N(0, 1)."""
    images, _ = half_images(2)
    source = ArraySource(np.repeat(images[:1], 64, axis=0), np.arange(64) % 2)
    spy, t_min, vp = SpyClassifier(), 0.2, LinearVP()
    fit(NoisyClassifierModule(spy, t_min=t_min, importance=importance), source, 2, 64, tmp_path)
    x0 = source.fetch([0])[0]
    for x_t, timesteps in spy.calls:
        t = timesteps / 999.0
        assert t.min() >= t_min and t.max() <= 1.0 and t.std() > 0.05
        z = (x_t - vp.alpha(t).view(-1, 1, 1, 1) * x0) / vp.sigma(t).view(-1, 1, 1, 1)
        assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1.0) < 0.1


def test_classifier_needs_labels_and_valid_arguments(tmp_path):
    images, _ = half_images(8)
    with pytest.raises(ValueError, match="class labels"):
        fit(NoisyClassifierModule(SpyClassifier()), ArraySource(images), 1, 8, tmp_path)
    for kwargs, message in [(dict(lr=-1.0), "lr must be > 0"), (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
                            (dict(t_min=0.0), r"t_min must be in \(0, 1\)")]:
        with pytest.raises(ValueError, match=message):
            NoisyClassifierModule(SpyClassifier(), **kwargs)


# --- checkpoints and data ---

@pytest.mark.parametrize("build", [
    lambda: ScoreModule(tiny_denoiser(), EDMLoss(), warmup_steps=2, ema_rampup_ratio=None),
    lambda: NoisyClassifierModule(tiny_classifier(), weight_decay=1e-7, importance=False),
], ids=["score", "classifier"])
def test_checkpoints_hold_primitive_hparams_and_load_weights_only(tmp_path, build):
    images, labels = half_images(8)
    module = build()
    trainer = fit(module, ArraySource(images, labels), 1, 8, tmp_path)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert hparams == dict(module.hparams)
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in hparams.values())
    restored = build()
    restored.load_state_dict(checkpoint["state_dict"])
    for key, value in module.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value)


def test_clean_loader_batches_images_and_labels():
    images, labels = half_images(10)
    batches = list(clean_loader(ArraySource(images, labels), 4))
    assert len(batches) == 2
    batch = batches[0]
    assert batch["x0"].shape == (4, 1, 8, 8) and batch["x0"].dtype == torch.float32
    assert set(batch["x0"].unique().tolist()) == {-1.0, 1.0}
    assert batch["class_labels"].dtype == torch.int64
    # every image is the half pattern its label says
    assert torch.all((batch["x0"][:, 0, 0, 0] < 0) == (batch["class_labels"] == 1))
    assert "class_labels" not in next(iter(clean_loader(ArraySource(images), 4)))
    assert len(list(clean_loader(ArraySource(images), 4, drop_last=False))) == 3
    with pytest.raises(ValueError, match="batch_size must be between 1 and the 10 samples"):
        clean_loader(ArraySource(images), 11)
