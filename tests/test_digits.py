"""The digits pipeline: the data split and user data sources, the metrics' feature networks, and every stage of
reduced runs (unconditional through the real entry point, class-conditional in process)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S
from netutils import write_random_inception_weights

from dg_lightning.data import RealFakeDataModule, load_digits_split
from dg_lightning.nets.adm import Discriminator
from dg_lightning.pipelines import digits, pipelines, run
from dg_lightning.pipelines.recipe import stage_dir
from dg_lightning.shards import load_shards

ROOT = Path(__file__).resolve().parents[1]
REDUCED = ["experiment=digits_edm_g++", "score.max_steps=20", "discriminator.classifier.max_steps=20", "data.num_fake=64",
           "trainer.max_epochs=2", "metrics.num_samples=40", "metrics.feature_steps=20", "callbacks.sampling.num_samples=16",
           "callbacks.sampling.every_n_epochs=1", "sampler.num_steps=4"]


def test_digits_split_is_disjoint_and_scaled_to_uint8():
    train, train_labels = load_digits_split("train", 597, seed=0)
    held_out, held_labels = load_digits_split("held_out", 597, seed=0)
    assert train.shape == (1200, 8, 8, 1) and held_out.shape == (597, 8, 8, 1) and train.dtype == np.uint8
    assert train.max() == 255 and train.min() == 0 and set(np.unique(train_labels)) == set(range(10))
    rows = {r.tobytes() for r in train}
    assert sum(r.tobytes() in rows for r in held_out) < 20  # sklearn's digits repeat a few images; the split does not
    again, _ = load_digits_split("held_out", 597, seed=0)
    assert np.array_equal(again, held_out) and len(held_labels) == 597
    with pytest.raises(ValueError, match="num_held_out"):
        load_digits_split("train", 1797)


@pytest.mark.slow
def test_reduced_digits_run_goes_through_every_stage_and_reuses_them(tmp_path):
    def run(*extra):
        result = subprocess.run([sys.executable, str(ROOT / "run.py"), *REDUCED, *extra], cwd=tmp_path,
                                capture_output=True, text=True, timeout=HANG_GUARD_S, check=False,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # one torch thread, as in conftest
        assert result.returncode == 0, result.stderr[-3000:]

    run()
    cache = tmp_path / "logs" / "cache" / "digits_edm_g++"
    stages = sorted(p.name.split("-")[0] for p in cache.iterdir())
    assert stages == ["feature_net", "generate", "pretrain_classifier", "pretrain_score", "sample_unguided", "train"]
    (train_dir,) = cache.glob("train-*")
    assert sorted(p.name for p in (train_dir / "sampling").glob("samples_epoch*.png")) == ["samples_epoch0.png", "samples_epoch1.png"]
    (run_dir,) = (tmp_path / "logs" / "digits_edm_g++" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # checkpoints.keep=1: last.ckpt and the checkpoint of the epoch the sampling callback found best.
    assert sorted(p.name for p in (train_dir / "checkpoints").iterdir()) == [
        f"epoch{int(metrics['sampling/best_epoch']):03d}.ckpt", "last.ckpt"]
    for prefix in ("eval", "eval_unguided"):
        for name in ("fid", "precision", "recall", "kid", "is"):
            assert math.isfinite(metrics[f"{prefix}/{name}"])
        assert 1.0 <= metrics[f"{prefix}/is"] <= 10.0
    assert metrics["eval_floor/fid"] < metrics["eval_unguided/fid"]  # a 20-step score model is far from the data
    assert metrics["eval/nfe"] == metrics["eval_unguided/nfe"] == 2 * 4 - 1  # EDM's Heun, sampler.num_steps=4
    assert metrics["sampling/best_epoch"] in (0, 1)
    # The fakes are drawn at base seed seed + 2**32, so unguided evaluation sample i (sampling_seed = seed = 0) is not
    # fake i (with one base seed all 40 were); a few saturated 8x8 images of this 20-step model may coincide by chance.
    (fake_dir,), (unguided_dir,) = cache.glob("generate-*"), cache.glob("sample_unguided-*")
    pairs = zip(load_shards(unguided_dir)[0], load_shards(fake_dir)[0])
    assert sum(np.array_equal(unguided, fake) for unguided, fake in pairs) <= 2
    # A different DG weight reuses every cached stage (the unguided samples too): no new stage folder.
    run("guidance.dg.weight=1.0")
    assert len(list(cache.iterdir())) == 6
    # select=best samples with the head the sampling callback kept by its guided FID: a train folder of its own.
    run("guidance.dg.weight=1.0", "discriminator.select=best")
    (best_dir,) = set(cache.glob("train-*")) - {train_dir}
    assert len(list(cache.iterdir())) == 7 and (best_dir / "sampling" / "best_discriminator.pt").exists()


@pytest.mark.parametrize("experiment", ["digits_edm_g++", "cifar10_edm_g++", "imagenet_dit_g++", "imagenet_adm_g++"])
def test_train_stage_key_has_the_guidance_only_when_the_callback_picks_the_weights(compose_cfg, experiment):
    def train_dir(*overrides):
        cfg = compose_cfg(f"experiment={experiment}", *overrides)
        (stage,) = [s for s in pipelines()[cfg.pipeline].stages if s.name == "train"]
        return stage_dir(cfg, "train", stage.declared_keys(cfg))

    # select=last: a DG weight or window sweep reuses one trained head.
    assert train_dir("guidance.dg.weight=1.0") == train_dir("guidance.dg.weight=2.0", "guidance.dg.t_max=0.5")
    # select=best: the epoch kept is the one with the best guided FID, which the guidance changes.
    best = ["discriminator.select=best"]
    assert train_dir(*best, "guidance.dg.weight=1.0") != train_dir(*best, "guidance.dg.weight=2.0")
    assert train_dir(*best, "guidance.dg.t_max=0.5") != train_dir(*best)
    # The sampling callback's settings decide its logged figures and select=best's pick.
    assert train_dir("callbacks.sampling.num_samples=7") != train_dir()
    # Each head seed trains a head of its own; the default (the run's seed) and the same seed given share one.
    assert train_dir("discriminator.seed=1") != train_dir("discriminator.seed=2") != train_dir()
    assert train_dir("seed=3") == train_dir("seed=3", "discriminator.seed=3")


def test_user_data_source_is_split_like_sklearn_digits(tmp_path):
    images, labels = load_digits_split("train", 597, seed=0)
    path = tmp_path / "digits.npz"
    np.savez(path, images=images, labels=labels.astype(np.int32))
    held_out, held_labels = load_digits_split("held_out", 200, seed=3, source=path)
    order = np.random.default_rng(3).permutation(len(images))[:200]
    assert np.array_equal(held_out, images[order]) and np.array_equal(held_labels, labels[order])
    assert held_labels.dtype == np.int64
    with pytest.raises(ValueError, match=r"must be in \(0, 1200\) for the 1200 images of .*digits.npz, got 1200"):
        load_digits_split("train", 1200, source=path)


BAD_SOURCES = {
    "empty": {"images": np.zeros((0, 8, 8, 1), np.uint8), "labels": np.zeros(0, np.int64)},
    "float_images": {"images": np.zeros((5, 8, 8, 1), np.float32), "labels": np.zeros(5, np.int64)},
    "nchw_images": {"images": np.zeros((5, 1, 8, 8), np.uint8), "labels": np.zeros(5, np.int64)},
    "float_labels": {"images": np.zeros((5, 8, 8, 1), np.uint8), "labels": np.zeros(5, np.float32)},
    "label_11": {"images": np.zeros((5, 8, 8, 1), np.uint8), "labels": np.full(5, 11)},
    "no_labels": {"images": np.zeros((5, 8, 8, 1), np.uint8)},
}


@pytest.mark.parametrize("name", [*BAD_SOURCES, "not_an_npz"])
def test_bad_data_source_names_the_file_and_the_expected_form_before_any_compute(compose_cfg, tmp_path, name):
    path = tmp_path / f"{name}.npz"
    if name == "not_an_npz":
        np.save(tmp_path / "array.npy", np.zeros((5, 8, 8, 1), np.uint8))
        (tmp_path / "array.npy").rename(path)
    else:
        np.savez(path, **BAD_SOURCES[name])
    cfg = compose_cfg("experiment=digits_edm_g++", f"data.source={path}")
    with pytest.raises(ValueError) as error:
        run(cfg)
    message = str(error.value)
    assert str(path) in message
    assert "expected an .npz with 'images' uint8 (N, 8, 8, 1) (NHWC, N >= 1) and 'labels' integer (N,) in [0, 10)" in message
    assert not (tmp_path / "logs" / "cache").exists()  # nothing was computed


def test_inception_feature_network_reads_grey_digits_from_the_local_weights(compose_cfg, tmp_path, monkeypatch):
    weights, stand_in = write_random_inception_weights(tmp_path)
    cfg = compose_cfg("experiment=digits_edm_g++", "metrics.features=inception", f"metrics.inception_path={weights}")
    features = digits.feature_net(SimpleNamespace(cfg=cfg))  # Inception needs no stage folder
    held_out, _ = load_digits_split("held_out", 597)
    batch = torch.from_numpy(held_out[:4]).permute(0, 3, 1, 2)
    with torch.no_grad():
        extracted = features(batch)
        assert extracted.shape == (4, 2048)
        assert torch.allclose(extracted, stand_in.eval()(batch.repeat(1, 3, 1, 1))[0].reshape(4, 2048), atol=1e-5)
    assert not digits.generative_metrics(cfg, features).inception_score  # IS only from a digits classifier
    assert not (tmp_path / "logs" / "cache").exists()  # no feature classifier was trained


@pytest.mark.slow
def test_reduced_conditional_run_gives_the_head_the_fakes_labels(compose_cfg, tmp_path, monkeypatch):
    seen = {"train": [], "head": []}
    diffuse, forward = RealFakeDataModule.diffuse, Discriminator.forward

    def spy_diffuse(self, batch):
        seen["train"].append({k: batch[k].clone() for k in ("x0", "is_real", "class_labels") if k in batch})
        return diffuse(self, batch)

    def spy_forward(self, x_vp, tau, class_labels=None):
        seen["head"].append(class_labels)
        return forward(self, x_vp, tau, class_labels)

    monkeypatch.setattr(RealFakeDataModule, "diffuse", spy_diffuse)
    monkeypatch.setattr(Discriminator, "forward", spy_forward)
    cfg = compose_cfg(*(o.replace("trainer.max_epochs=2", "trainer.max_epochs=1") for o in REDUCED),
                      "discriminator.conditional=true", "logger=csv")
    metrics = run(cfg)
    assert all(math.isfinite(v) for v in metrics.values()) and "eval/is" in metrics and "eval_unguided/kid" in metrics

    cache = tmp_path / "logs" / "cache" / "digits_edm_g++"
    (fake_dir,) = cache.glob("generate-*")
    fakes, fake_labels = load_shards(fake_dir, expect_labels=True)
    assert len(np.unique(fake_labels)) > 3
    (score_dir,) = cache.glob("pretrain_score-*")
    score = torch.load(score_dir / "score_ema.pt", weights_only=True)
    assert score["model.map_label.weight"].shape[1] == 10  # the score model takes one-hot labels
    # Training: every fake row reaches the head with the label it was generated with.
    label_of = {image.tobytes(): label for image, label in zip(fakes, fake_labels)}
    checked = 0
    for batch in seen["train"]:
        fake_rows = ~batch["is_real"]
        images = torch.round((batch["x0"][fake_rows] + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert [label_of[image.tobytes()] for image in images] == batch["class_labels"][fake_rows].tolist()
        checked += len(images)
    assert checked >= 64
    assert all(labels is not None and labels.dtype == torch.int64 for labels in seen["head"])
    # Sampling: the head's last call (final DG samples, one batch) gets the labels the DG samples were drawn with.
    _, dg_labels = load_shards(tmp_path / "out" / "samples_dg", expect_labels=True)
    assert torch.equal(seen["head"][-1], torch.from_numpy(dg_labels))
