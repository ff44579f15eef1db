"""Sweeps: the trained discriminator is reused across DG settings, a re-launched sweep skips its finished points, one
W&B group with readable run names, the report reads the folders, and a local multirun refuses in-job DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write

from dg_lightning.config import ConfigError
from dg_lightning.report import main as report_main
from dg_lightning.pipelines.recipe import finished_metrics, launch, write_metrics

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS, T_MINS = (0, 1), (0.01, 0.1)
SWEEP = ["-m", "experiment=toy2d", "guidance.dg.weight=0,1", "guidance.dg.t_min=0.01,0.1", "trainer.max_steps=30",
         "data.num_fake=300", "data.num_real=300", "data.num_held_out=100", "metrics.num_samples=200",
         "sampler.num_steps=8"]


def run_py(cwd, *args):
    """Run `python run.py ARGS` in folder cwd with one torch thread (as in conftest); fail with its output."""
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=HANG_GUARD_S, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_sweep_trains_once_shares_a_group_reports_and_a_relaunch_skips_finished_points(tmp_path):
    run_py(tmp_path, *SWEEP)  # the default sweep folder logs/toy2d/multiruns/<now>, whose `now` the W&B group shares
    (sweep_dir,) = (tmp_path / "logs" / "toy2d" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / "metrics.json").is_file())
    points = [(w, t) for w in WEIGHTS for t in T_MINS]
    dirnames = [",".join(sorted([*SWEEP[4:], f"guidance.dg.weight={w}", f"guidance.dg.t_min={t}"]))  # no experiment
                for w, t in points]
    assert [j.name for j in jobs] == [f"{i}_{name}" for i, name in enumerate(dirnames)]  # readable
    assert len(list((tmp_path / "logs" / "cache" / "toy2d").glob("train-*"))) == 1  # the train key has no guidance
    # Only the first point trained (logged train/loss); the others loaded the cached discriminator.
    trained = ["train/loss" in (j / "csv" / "metrics.csv").read_text().splitlines()[0] for j in jobs]
    assert trained == [True, False, False, False]
    configs = [OmegaConf.load(j / "resolved_config.yaml") for j in jobs]
    assert [(c.guidance.dg.weight, c.guidance.dg.t_min) for c in configs] == points
    groups = {c.logger.wandb.group for c in configs}
    assert len(groups) == 1 and groups.pop().startswith("toy2d-")  # one W&B group per sweep
    assert [c.logger.wandb.name for c in configs] == [f"toy2d/{name}" for name in dirnames]
    metrics = dict(zip(points, (json.loads((j / "metrics.json").read_text()) for j in jobs)))
    # DG weight 0 is the unguided sampler, whatever t_min.
    assert metrics[(0, 0.01)]["toy/swd_dg"] == pytest.approx(metrics[(0, 0.01)]["toy/swd_no_dg"])

    report_main([str(sweep_dir), "--metric", "toy/swd_dg"])
    table = (sweep_dir / "report.md").read_text().splitlines()
    assert table[0] == "| guidance.dg.weight | toy/swd_dg (t_min=0.01) | toy/swd_dg (t_min=0.1) |" and len(table) == 4
    for row, w in zip(table[2:], WEIGHTS):
        assert row == f"| {w} | " + " | ".join(f"{metrics[(w, t)]['toy/swd_dg']:.4f}" for t in T_MINS) + " |"
    assert (sweep_dir / "report.png").stat().st_size > 5000

    stamps = [(j / "metrics.json").stat().st_mtime_ns for j in jobs]
    run_py(tmp_path, *SWEEP, f"hydra.sweep.dir={sweep_dir}")  # the same sweep again: every point is finished
    assert [(j / "metrics.json").stat().st_mtime_ns for j in jobs] == stamps


def test_a_finished_point_is_skipped_only_with_the_same_config(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=toy2d")
    assert finished_metrics(cfg) is None
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True)
    (out / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    assert finished_metrics(cfg) is None  # no metrics.json: the point did not finish
    write_metrics(out, {"toy/swd_dg": 0.25})
    assert finished_metrics(cfg) == {"toy/swd_dg": 0.25}
    with open_dict(cfg):
        cfg.logger.wandb.group = "toy2d-relaunched"  # a re-launch has a new W&B group: still the same point
    assert finished_metrics(cfg) == {"toy/swd_dg": 0.25}
    assert finished_metrics(compose_cfg("experiment=toy2d", "guidance.dg.weight=2")) is None  # another point


def test_local_multirun_refuses_in_job_ddp_before_any_compute(compose_cfg, monkeypatch):
    for name in ("LOCAL_RANK", "SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    cfg = compose_cfg("trainer=ddp_cpu")
    hydra_cfg = HydraConfig.get()
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.mode = RunMode.MULTIRUN
    with pytest.raises(ConfigError, match="trainer.strategy.*hydra/launcher=slurm"):
        launch(cfg)


def test_slurm_launcher_gives_one_rank_per_gpu():
    slurm = OmegaConf.load(ROOT / "conf" / "hydra" / "launcher" / "slurm.yaml")
    assert slurm.defaults == ["submitit_slurm"]
    slurm.gpus_per_node = 8
    assert slurm.tasks_per_node == 8 and {"nodes", "timeout_min", "partition"} <= set(slurm)


def test_a_failing_sweep_point_reports_its_error_when_it_fails(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", "guidance.dg.weight=-1,-2"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=HANG_GUARD_S, check=False)
    assert result.returncode != 0
    # Each point's error is logged as it fails (in its run.log and on the console), before the next point starts.
    first_error = result.stdout.find("config key 'guidance.dg.weight': must be a finite number >= 0, got -1")
    assert 0 <= first_error < result.stdout.find("#1 : guidance.dg.weight=-2")
    (sweep_dir,) = (tmp_path / "logs" / "toy2d" / "multiruns").iterdir()
    for point, weight in enumerate((-1, -2)):
        assert f"must be a finite number >= 0, got {weight}" in (sweep_dir / f"{point}_guidance.dg.weight={weight}" / "run.log").read_text()
