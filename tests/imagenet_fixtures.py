"""Scaffolding shared by the ImageNet pipeline tests (test_imagenet_pipeline.py: DiT-G++, test_adm_g_pipeline.py:
ADM-G++): tiny networks with the same weights in every run, a class-folder image set and ADM reference batch in the
released layout, and one smoke run's checks (every stage through run.py, the evaluator exports, DG weight 0 giving
exactly the baseline, a bad input stopping the run before any compute)."""

import csv
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from test_run import run_py

from dg_lightning.config import ConfigError
from dg_lightning.evaluation import PooledPixels
from dg_lightning.pipelines import run

CLASSES = ("n01440764", "n01443537", "n01484850")
METRICS = ("fid", "sfid", "is", "precision", "recall")
NUM_REFERENCE = 24


def seeded(build, seed=0):
    """build() with the global torch RNG seeded by `seed` and restored afterwards: a network's default initialisation
    is the same in every run, whichever tests ran before (torch seeds each process at random)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def write_images_and_reference(folder, height, width, reference_size):
    """4 JPEGs of odd sizes per class of CLASSES under folder/imagenet/train/<wnid> (image j of class c is
    height[0] + j height[1] by width[0] + c width[1] pixels), and ADM's reference batch VIRTUAL_imagenet256_labeled.npz:
    NUM_REFERENCE random uint8 images of reference_size^2 with their evaluation.PooledPixels statistics."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (folder / "imagenet" / "train" / name).mkdir(parents=True)
        for j in range(4):
            pixels = rng.integers(0, 256, (height[0] + height[1] * j, width[0] + width[1] * c, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "imagenet" / "train" / name / f"{name}_{j}.JPEG", quality=95)
    images = rng.integers(0, 256, (NUM_REFERENCE, reference_size, reference_size, 3), dtype=np.uint8)
    with torch.no_grad():
        pool, spatial, _ = PooledPixels()(torch.from_numpy(images).permute(0, 3, 1, 2))
    pool, spatial = pool.double().numpy(), spatial.double().numpy()
    np.savez(folder / "VIRTUAL_imagenet256_labeled.npz", arr_0=images, mu=pool.mean(0), sigma=np.cov(pool, rowvar=False),
             mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False))


@dataclass(frozen=True)
class Smoke:
    """An ImageNet pipeline's smoke: experiment=<experiment> +smoke=<name> on the tiny released files of a folder,
    num_samples uint8 samples of image_size per set; `extra` overrides every run needs."""

    experiment: str
    name: str
    image_size: int
    num_samples: int
    extra: tuple = ()

    def overrides(self, released, *more):
        """The command-line overrides of a run on the released files in `released`, then `more`."""
        return [f"experiment={self.experiment}", f"+smoke={self.name}", f"paths.released_dir={released}", *self.extra,
                *more]

    def cache(self, tmp_path, stage):
        """The cache folders of `stage` of runs logging under tmp_path/logs."""
        return sorted((tmp_path / "logs" / "cache" / self.experiment).glob(f"{stage}-*"))

    def run_every_stage(self, tmp_path, released):
        """Run every stage through run.py in tmp_path; check the metrics (all five of both sets, finite, in range, DG
        changed the FID) and the evaluator exports (arr_0 uint8 NHWC, arr_1 int64 labels, the same labels in both
        sets); returns the run folder and the metrics."""
        run_py(tmp_path, *self.overrides(released))
        (run_dir,) = (tmp_path / "logs" / self.experiment / "runs").iterdir()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert set(metrics) == {f"{p}/{k}" for p in ("eval", "eval_unguided") for k in METRICS} | {
            "sampling/best_epoch", "sampling/best_fid", "eval/nfe", "eval_unguided/nfe"}
        assert all(np.isfinite(v) for v in metrics.values())
        assert metrics["eval/nfe"] == metrics["eval_unguided/nfe"] == 10  # one call a step, the smoke's respacing 10
        # The guided-sampling callback (every epoch in the smoke overlay) scored epoch 0 with ADM's evaluation.
        (logged,) = [row for row in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if row.get("sampling/fid")]
        assert int(logged["epoch"]) == metrics["sampling/best_epoch"] == 0
        assert float(logged["sampling/fid"]) == pytest.approx(metrics["sampling/best_fid"], rel=1e-6)
        assert all(np.isfinite(float(logged[f"sampling/{k}"])) for k in METRICS)
        for prefix in ("eval", "eval_unguided"):
            assert 0 <= metrics[f"{prefix}/precision"] <= 1 and 0 <= metrics[f"{prefix}/recall"] <= 1
            assert 1 <= metrics[f"{prefix}/is"] <= PooledPixels.num_features
            assert metrics[f"{prefix}/fid"] > 0 and metrics[f"{prefix}/sfid"] > 0
        assert metrics["eval/fid"] != metrics["eval_unguided/fid"]  # DG changed the samples

        with np.load(run_dir / "eval_samples.npz") as guided, np.load(run_dir / "eval_unguided_samples.npz") as baseline:
            for npz in (guided, baseline):
                assert sorted(npz.files) == ["arr_0", "arr_1"]
                assert npz["arr_0"].dtype == np.uint8
                assert npz["arr_0"].shape == (self.num_samples, self.image_size, self.image_size, 3)
                assert npz["arr_1"].dtype == np.int64 and 0 <= npz["arr_1"].min() and npz["arr_1"].max() < 1000
            assert np.array_equal(guided["arr_1"], baseline["arr_1"])  # same seeds, same labels
        return run_dir, metrics

    def check_dg_weight_zero_is_the_baseline(self, tmp_path, released, metrics):
        """A run with DG weight 0 after run_every_stage (whose metrics are given) gives exactly the baseline's metrics,
        reusing its real data, fakes and head. It runs through run.py as well: with another torch thread count (pytest
        runs one) a sum's order, and so a last bit and then a uint8 level, could differ."""
        runs = tmp_path / "logs" / self.experiment / "runs"
        before = set(runs.iterdir())
        run_py(tmp_path, *self.overrides(released, "guidance.dg.weight=0"))
        (zero_dir,) = set(runs.iterdir()) - before
        zero = json.loads((zero_dir / "metrics.json").read_text())
        assert all(zero[f"eval/{k}"] == zero[f"eval_unguided/{k}"] == metrics[f"eval_unguided/{k}"] for k in METRICS)
        assert [len(self.cache(tmp_path, stage)) for stage in ("encode", "generate", "train")] == [1, 1, 1]

    def check_stops_before_any_compute(self, tmp_path, compose_cfg, released, match, *more):
        """A run with `more` raises a ConfigError matching `match` before writing anything to the cache."""
        with pytest.raises(ConfigError, match=match):
            run(compose_cfg(*self.overrides(released, "logger=csv", *more)))
        assert not (tmp_path / "logs" / "cache").exists()
