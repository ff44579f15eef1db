"""The real entry point end to end: experiment=toy2d, on the default and on another mixture pair, and the sweep
report's refusal of a folder without runs (a Hydra sweep and its report: test_sweep)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S

from dg_lightning.pipelines import run
from dg_lightning.report import main as report_main
from mixtures import other_pair
from test_published import assert_published

ROOT = Path(__file__).resolve().parents[1]


def run_py(cwd, *args, timeout=HANG_GUARD_S, one_thread=True):
    """Run `python run.py ARGS` in folder cwd with the default paths (logs under cwd/logs) and, with one_thread, one
    torch thread (as in conftest: with two on two cores, a busy core stalled the default toy run from 30 s to over 8
    minutes; else torch's default, as a user runs it); fail with its output."""
    threads = {"OMP_NUM_THREADS": "1"} if one_thread else {}
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **threads})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_toy2d_default_run_writes_metrics_and_dg_halves_the_error(tmp_path):
    run_py(tmp_path)
    (run_dir,) = (tmp_path / "logs" / "toy2d" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"toy/swd_no_dg", "toy/swd_dg", "toy/swd_dg_optimal", "toy/swd_floor",
                            "toy/nfe_no_dg", "toy/nfe_dg", "toy/nfe_dg_optimal", "sampling/best_epoch", "sampling/best_swd"}
    assert metrics["toy/nfe_dg"] == 2 * 18 - 1  # EDM's Heun, 18 steps
    # The sampling callback's 5 evaluations (every 40 of 200 epochs), each a figure; the best SWD is one of them.
    (train,) = (tmp_path / "logs" / "cache" / "toy2d").glob("train-*")
    logged = [float(row["sampling/swd"]) for row in csv.DictReader(open(run_dir / "csv" / "metrics.csv"))
              if row.get("sampling/swd")]
    assert len(logged) == 5 and metrics["sampling/best_swd"] == pytest.approx(min(logged), rel=1e-6)
    assert sorted(p.name for p in (train / "sampling").glob("samples_epoch*.png")) == \
        sorted(f"samples_epoch{e}.png" for e in (39, 79, 119, 159, 199))
    assert metrics["toy/swd_dg"] <= 0.5 * metrics["toy/swd_no_dg"]
    assert metrics["toy/swd_dg_optimal"] <= 0.5 * metrics["toy/swd_no_dg"]
    assert (run_dir / "toy2d.png").stat().st_size > 10000
    assert_published("toy2d", metrics)
    assert (run_dir / "csv" / "metrics.csv").exists()


@pytest.mark.slow
def test_toy2d_trained_discriminator_on_another_mixture_pair(compose_cfg, tmp_path):
    data, model = other_pair()
    overrides = []
    for key, mixture in (("data.mixture", data), ("score.mixture", model)):
        for field in ("means", "covariances", "weights"):
            overrides.append(f"{key}.{field}={getattr(mixture, field).tolist()}".replace(" ", ""))
    # 2,000 steps (a quarter of the default) with one callback evaluation: the halving holds with room to spare
    metrics = run(compose_cfg(*overrides, "logger=csv", "trainer.max_steps=2000", "callbacks.sampling.every_n_epochs=50"))
    assert metrics["toy/swd_dg"] <= 0.5 * metrics["toy/swd_no_dg"]


def test_report_refuses_an_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        report_main([str(tmp_path)])
