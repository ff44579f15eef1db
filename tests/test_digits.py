"""The digits pipeline: the data split, and every stage of a reduced run through the real entry point."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dg_lightning.data import load_digits_split

ROOT = Path(__file__).resolve().parents[1]
REDUCED = ["experiment=digits_edm_g++", "score.max_steps=20", "discriminator.classifier.max_steps=20", "data.num_fake=64",
           "trainer.max_epochs=2", "metrics.num_samples=40", "metrics.feature_steps=20", "metrics.sampling_callback.num_samples=16",
           "metrics.sampling_callback.every_n_epochs=1", "sampler.num_steps=4"]


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
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    run()
    cache = tmp_path / "logs" / "cache" / "digits_edm_g++"
    stages = sorted(p.name.split("-")[0] for p in cache.iterdir())
    assert stages == ["feature_net", "generate", "pretrain_classifier", "pretrain_score", "sample_unguided", "train"]
    (train_dir,) = cache.glob("train-*")
    assert sorted(p.name for p in (train_dir / "checkpoints").iterdir()) == ["epoch000.ckpt", "epoch001.ckpt", "last.ckpt"]
    assert sorted(p.name for p in (train_dir / "sampling").glob("samples_epoch*.png")) == ["samples_epoch0.png", "samples_epoch1.png"]
    (run_dir,) = (tmp_path / "logs" / "digits_edm_g++" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for prefix in ("eval", "eval_unguided"):
        for name in ("fid", "precision", "recall"):
            assert math.isfinite(metrics[f"{prefix}/{name}"])
    assert metrics["eval_floor/fid"] < metrics["eval_unguided/fid"]  # a 20-step score model is far from the data
    assert metrics["sampling/best_epoch"] in (0, 1)
    # A different DG weight reuses every cached stage (the unguided samples too): no new stage folder;
    # select=best samples with the head the sampling callback kept.
    run("guidance.dg.weight=1.0", "discriminator.select=best")
    assert len(list(cache.iterdir())) == 6
    assert (train_dir / "sampling" / "best_discriminator.pt").exists()
