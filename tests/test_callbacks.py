"""GuidedSamplingCallback: epochs it runs at, seed-determined sample sets, best-epoch tracking, resume, grids, frozen discriminator."""

import csv

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from dg_lightning.callbacks import GuidedSamplingCallback, SamplingTask
from dg_lightning.data import ArraySource, RealFakeDataModule
from dg_lightning.generate import sample_batches
from dg_lightning.shards import to_uint8
from dg_lightning.guidance import DiscriminatorGuidance
from dg_lightning.metrics import GenerativeMetrics
from dg_lightning.module import DiscriminatorModule, frozen
from dg_lightning.samplers import edm_sampler
from dg_lightning.training import epoch_checkpoints

SHAPE = (1, 4, 4)


class Flatten(torch.nn.Module):
    """Identity 'feature extractor': uint8 (B, 1, 4, 4) images as 16-d float vectors."""

    num_features = 16

    def forward(self, images):
        return images.float().flatten(1)


class TinyDiscriminator(torch.nn.Module):
    """(x_vp, tau, labels) -> logit: a frozen eval-mode projection (as a pretrained encoder) and a trainable head."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(16, 8).requires_grad_(False).eval()
        self.head = torch.nn.Linear(9, 1)

    def forward(self, x_vp, tau, class_labels=None):
        return self.head(torch.cat([self.encoder(x_vp.flatten(1)), tau.view(-1, 1)], dim=1)).squeeze(-1)


def gaussian_denoiser(x, sigma, class_labels=None):
    """The exact denoiser for data N(0, I): D(x; sigma) = x / (1 + sigma^2)."""
    return x / (1 + sigma.view(-1, 1, 1, 1) ** 2)


def real_images(n=32, seed=0):
    """uint8 (n, 1, 4, 4) 'real' images: N(0, 0.3^2) quantised."""
    return to_uint8(0.3 * torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed)))


def datamodule():
    """Real vs fake 4x4 images for the discriminator (uint8 NHWC sources)."""
    real = ArraySource(real_images(16, seed=1).permute(0, 2, 3, 1).numpy())
    fake = ArraySource(to_uint8(0.5 * torch.randn((16, *SHAPE))).permute(0, 2, 3, 1).numpy())
    return RealFakeDataModule(real, fake, batch_size=8)


TASK_ARGS = ("shape", "real_images", "num_classes", "batch_size")


def make_callback(tmp_path, sample_fn, metrics=None, **kwargs):
    """A callback bound to a task on 4x4 images with identity features and 32 real images (kwargs: the task's
    TASK_ARGS and the callback's own)."""
    task = {"shape": SHAPE, "real_images": real_images(), "batch_size": 5,
            **{key: kwargs.pop(key) for key in TASK_ARGS if key in kwargs}}
    metrics = GenerativeMetrics(Flatten(), reset_real_features=False) if metrics is None else metrics
    callback = GuidedSamplingCallback(**{"num_samples": 12, "out_dir": tmp_path / "sampling", **kwargs})
    return callback.bind(SamplingTask(sample_fn, metrics, **task))


def fit(tmp_path, callbacks, max_epochs=3, logger=False, ckpt_path=None, **module):
    """Train a DiscriminatorModule (its keyword arguments `module`) on TinyDiscriminator with the given callbacks on
    CPU."""
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(DiscriminatorModule(TinyDiscriminator(), **module), datamodule(), ckpt_path=ckpt_path)


def plain_sample_fn(discriminator, latents, class_labels, noise):
    """Samples 0.3 z, ignoring the discriminator."""
    return 0.3 * latents


@pytest.mark.parametrize("every_n_epochs, expected", [(2, [1]), (1, [0, 1, 2])])
def test_runs_every_n_epochs_and_logs_through_the_loggers(tmp_path, every_n_epochs, expected):
    """max_epochs 3: every 2 epochs runs at epoch index 1 only, every 1 at 0, 1, 2; the CSV logger gets the metrics."""
    callback = make_callback(tmp_path, plain_sample_fn, every_n_epochs=every_n_epochs)
    fit(tmp_path, [callback, RichProgressBar()], logger=CSVLogger(tmp_path, name="csv"))
    assert [h["epoch"] for h in callback.history] == expected
    assert sorted(p.name for p in (tmp_path / "sampling").glob("samples_epoch*.png")) == [f"samples_epoch{e}.png" for e in expected]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("sampling/fid")]
    assert [int(row["epoch"]) for row in rows] == expected
    for row, h in zip(rows, callback.history):
        assert {key: float(row[f"sampling/{key}"]) for key in ("fid", "precision", "recall")} == pytest.approx(
            {key: h[key] for key in ("fid", "precision", "recall")}, rel=1e-6)
    assert 0 <= callback.history[0]["precision"] <= 1 and callback.history[0]["fid"] > 0


def test_sample_set_is_independent_of_batch_size_and_rank_split():
    """Sample i is the same for batch sizes 3, 1 and for a split over two ranks; another base seed changes it."""
    def sample_fn(latents, labels, noise):
        return torch.tanh(latents + noise.randn_like(latents) + labels.view(-1, 1, 1, 1))

    def samples(indices, batch_size):
        out = {}
        for batch, images, _ in sample_batches(sample_fn, indices, SHAPE, base_seed=3, num_classes=5, batch_size=batch_size):
            out.update(zip(batch, images))
        return out

    whole = samples(range(10), batch_size=3)
    assert sorted(whole) == list(range(10))
    assert len({tuple(x.flatten().tolist()) for x in whole.values()}) == 10
    for other in [samples(range(10), 1), {**samples(range(0, 10, 2), 4), **samples(range(1, 10, 2), 1)}]:
        assert sorted(other) == sorted(whole) and all(torch.equal(other[i], whole[i]) for i in whole)
    (_, other_seed, _), = sample_batches(sample_fn, range(1), SHAPE, base_seed=4, num_classes=5)
    assert not torch.equal(other_seed[0], whole[0])


def test_callback_samples_the_same_set_for_batch_size_1_and_3(tmp_path):
    """Through a Trainer, the grid of all 7 samples and the FID match for batch sizes 1 and 3."""
    grids, fids = [], []
    for batch_size in (1, 3):
        out = tmp_path / f"b{batch_size}"
        callback = make_callback(out, plain_sample_fn, batch_size=batch_size, num_samples=7, grid_size=7)
        fit(out, [callback], max_epochs=1)
        grids.append(np.asarray(Image.open(out / "sampling" / "samples_epoch0.png")))
        fids.append(callback.history[0]["fid"])
    np.testing.assert_array_equal(grids[0], grids[1])
    assert grids[0].std() > 0
    assert fids[0] == pytest.approx(fids[1], rel=1e-9)


@pytest.mark.parametrize("mode, best", [("min", 1), ("max", 2)])
def test_best_epoch_follows_the_monitored_metric_and_saves_its_weights(tmp_path, mode, best):
    """Samples are shifted by 0.4, 0.0, 0.8 at epochs 0, 1, 2: FID is lowest at epoch 1 and highest at epoch 2."""
    shifts, weights = [0.4, 0.0, 0.8], {}  # weights: the discriminator's state at each evaluation

    def sample_fn(discriminator, latents, class_labels, noise):
        weights.setdefault(len(callback.history), {k: v.clone() for k, v in discriminator.state_dict().items()})
        return (0.3 * latents + shifts[len(callback.history)]).clip(-1, 1)

    callback = make_callback(tmp_path, sample_fn, mode=mode)
    fit(tmp_path, [callback])
    fids = [h["fid"] for h in callback.history]
    assert fids[1] < fids[0] < fids[2]
    assert callback.best_epoch == best and callback.best_score == fids[best]
    saved = torch.load(tmp_path / "sampling" / "best_discriminator.pt", weights_only=True)
    assert saved.keys() == weights[best].keys()
    assert all(torch.equal(saved[k], weights[best][k]) for k in saved)
    assert not torch.equal(weights[0]["head.weight"], weights[2]["head.weight"])  # the weights did change


@pytest.mark.parametrize("keep, kept", [(1, [1]), (2, [0, 1]), (0, []), (-1, [0, 1, 2])])
def test_the_discriminator_keeps_last_and_the_best_epochs_by_the_callbacks_fid(tmp_path, keep, kept):
    """FID is lowest at epoch 1, then epoch 0 (shifts 0.4, 0.0, 0.8): epoch 1's checkpoint holds best_discriminator.pt."""
    shifts = [0.4, 0.0, 0.8]

    def sample_fn(discriminator, latents, class_labels, noise):
        return (0.3 * latents + shifts[len(callback.history)]).clip(-1, 1)

    callback = make_callback(tmp_path, sample_fn)
    fit(tmp_path, [callback, *epoch_checkpoints(tmp_path / "checkpoints", keep, [callback])])
    assert callback.best_epoch == 1
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == [f"epoch{e:03d}.ckpt" for e in kept] + ["last.ckpt"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2
    if 1 in kept:
        best = torch.load(tmp_path / "checkpoints" / "epoch001.ckpt", weights_only=True)["state_dict"]
        saved = torch.load(tmp_path / "sampling" / "best_discriminator.pt", weights_only=True)
        assert all(torch.equal(best[f"discriminator.{k}"], saved[k]) for k in saved if f"discriminator.{k}" in best)


def test_state_dict_round_trip_and_resume_from_checkpoint(tmp_path):
    """state_dict/load_state_dict copy the record; a run resumed from last.ckpt continues history and keeps the best."""
    shifts = [0.0, 0.5, 0.3, 0.1]

    def sample_fn(discriminator, latents, class_labels, noise):
        return (0.3 * latents + shifts[len(callback.history)]).clip(-1, 1)

    callback = make_callback(tmp_path, sample_fn)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path, [callback, checkpoint], max_epochs=2)
    state = callback.state_dict()
    assert state["best_epoch"] == 0 and [h["epoch"] for h in state["history"]] == [0, 1]

    copy = make_callback(tmp_path, sample_fn)
    copy.load_state_dict(state)
    assert (copy.best_epoch, copy.best_score, copy.history) == (callback.best_epoch, callback.best_score, callback.history)

    first = callback
    callback = make_callback(tmp_path, sample_fn)  # a fresh run resumed from the last checkpoint
    fit(tmp_path, [callback, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_epochs=4,
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["epoch"] for h in callback.history] == [0, 1, 2, 3]
    assert callback.history[:2] == first.history
    assert callback.best_epoch == 0 and callback.best_score == first.best_score
    assert callback.history[3]["fid"] < callback.history[2]["fid"]


def test_grid_file_has_the_expected_size_and_goes_to_wandb(tmp_path, monkeypatch):
    """The PNG grid has make_grid's pixel size and is logged (through the real WandbLogger.log_image) under the prefix."""
    logged = []
    logger = WandbLogger(save_dir=tmp_path, mode="disabled")
    original = logger.log_image

    def spy(key, images, **kwargs):
        logged.append((key, images, kwargs))
        original(key, images, **kwargs)

    monkeypatch.setattr(logger, "log_image", spy)
    callback = make_callback(tmp_path, plain_sample_fn, grid_size=5, prefix="probe", monitor="recall", mode="max")
    fit(tmp_path, [callback], max_epochs=1, logger=logger)
    path = tmp_path / "sampling" / "samples_epoch0.png"
    # 5 images of 4x4 in rows of ceil(sqrt(5)) = 3, 2 pixels of padding: (3 * 6 + 2) x (2 * 6 + 2)
    assert Image.open(path).size == (20, 14)
    assert [(key, images) for key, images, _ in logged] == [("probe/samples", [str(path)])]
    assert logged[0][2]["caption"] == ["epoch 0"]


def test_guided_sampling_leaves_no_parameter_gradients_and_restores_modes(tmp_path):
    """A real EDM + DG sampler: guidance changes the samples, the discriminator is frozen during sampling and restored after."""
    seen = []

    def sample_fn(discriminator, latents, class_labels, noise):
        guidance = DiscriminatorGuidance(discriminator, t_min=0.0)
        kwargs = dict(class_labels=class_labels, dg=guidance, num_steps=4, sigma_max=5.0, randn_like=noise.randn_like)
        guided = edm_sampler(gaussian_denoiser, latents, dg_weight=20.0, dg_weight_2nd=20.0, **kwargs)
        plain = edm_sampler(gaussian_denoiser, latents, **kwargs)
        seen.append((discriminator.training, [p.requires_grad for p in discriminator.parameters()], (guided - plain).abs().max()))
        return guided.clip(-1, 1)

    class Probe(L.Callback):
        """Snapshots the discriminator's grads, modes and flags before the sampling callback, compares after."""

        def __init__(self):
            self.snapshots = []

        def on_train_epoch_end(self, trainer, pl_module):
            d = pl_module.discriminator
            self.snapshots.append(([None if p.grad is None else p.grad.clone() for p in d.parameters()],
                                   [m.training for m in d.modules()], [p.requires_grad for p in d.parameters()]))

    before, after = Probe(), Probe()
    fit(tmp_path, [before, make_callback(tmp_path, sample_fn, num_samples=6), after], max_epochs=1)

    assert seen and all(not training and not any(flags) and diff > 1e-3 for training, flags, diff in seen)
    (grads_b, modes_b, flags_b), (grads_a, modes_a, flags_a) = before.snapshots[0], after.snapshots[0]
    assert modes_a == modes_b and modes_b == [True, False, True]  # the frozen encoder stays in eval mode
    assert flags_a == flags_b == [False, False, True, True]
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_with_an_ema_the_callback_scores_and_keeps_the_ema_weights_and_training_goes_on_with_its_own(tmp_path):
    """discriminator.ema_decay: the samples are guided by the EMA weights (what guides after training), the best
    epoch's file holds them, and the training weights are back in place after each evaluation."""
    seen = []

    def sample_fn(discriminator, latents, class_labels, noise):
        seen.append(discriminator.head.weight.detach().clone())
        return plain_sample_fn(discriminator, latents, class_labels, noise)

    class Weights(L.Callback):
        """The head's training weights and the EMA's averages at each epoch's end."""

        def __init__(self):
            self.heads, self.averages = [], []

        def on_train_epoch_end(self, trainer, pl_module):
            self.heads.append(pl_module.discriminator.head.weight.detach().clone())
            self.averages.append(pl_module.ema.averages()[0].clone())  # the head's weight: the first trainable one

    before, after = Weights(), Weights()
    fit(tmp_path, [before, make_callback(tmp_path, sample_fn, num_samples=6, batch_size=6), after], max_epochs=2,
        ema_decay=0.5)
    assert len(seen) == 2
    for guided, head, head_after, average in zip(seen, before.heads, after.heads, before.averages):
        assert torch.equal(guided, average) and not torch.equal(guided, head)
        assert torch.equal(head_after, head)
    best = torch.load(tmp_path / "sampling" / "best_discriminator.pt", weights_only=True)["head.weight"]
    assert any(torch.equal(best, guided) for guided in seen)


def test_frozen_restores_after_an_error():
    """frozen() restores each submodule's mode and each parameter's flag even when the block raises."""
    net = TinyDiscriminator()
    with pytest.raises(RuntimeError, match="boom"), frozen(net):
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        raise RuntimeError("boom")
    assert net.training and not net.encoder.training
    assert [p.requires_grad for p in net.parameters()] == [False, False, True, True]


def test_argument_errors_name_the_argument(tmp_path):
    """Bad arguments fail at construction with the argument's name; grid_size is capped at num_samples."""
    with pytest.raises(ValueError, match="monitor must be one of .*'fid'.*got 'precision'"):
        make_callback(tmp_path, plain_sample_fn, GenerativeMetrics(Flatten(), precision_recall=False,
                                                                   reset_real_features=False), monitor="precision")
    with pytest.raises(ValueError, match="reset_real_features=False"):
        make_callback(tmp_path, plain_sample_fn, GenerativeMetrics(Flatten()))
    with pytest.raises(ValueError, match="real_images is given, but"):
        make_callback(tmp_path, plain_sample_fn, GenerativeMetrics(Flatten(), fid_reference=(torch.zeros(16), torch.eye(16)),
                                                                   precision_recall=False))
    with pytest.raises(RuntimeError, match="no SamplingTask bound"):
        fit(tmp_path, [GuidedSamplingCallback()], max_epochs=1)
    with pytest.raises(ValueError, match="real_images is None"):
        make_callback(tmp_path, plain_sample_fn, real_images=None)
    with pytest.raises(ValueError, match="mode"):
        make_callback(tmp_path, plain_sample_fn, mode="best")
    with pytest.raises(ValueError, match="batch_size"):
        make_callback(tmp_path, plain_sample_fn, batch_size=0)
    with pytest.raises(ValueError, match="sample_fn returned"):
        next(sample_batches(lambda z, y, n: to_uint8(z), range(2), SHAPE))
    assert make_callback(tmp_path, plain_sample_fn, grid_size=100).grid_size == 12
