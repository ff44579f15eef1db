"""The sweep report on hand-made sweep folders: cells pool the jobs that differ only in other swept keys (mean ± sample
std, n), --minus gives paired differences with the count below 0, --all pools each column, bad keys are named."""

import json
import socket
import statistics
import subprocess
import sys

import numpy as np

import pytest
from omegaconf import OmegaConf

from dg_lightning.report import baselines, bootstrap_interval, collect, load_jobs, main as report_main, pooled
from dg_lightning.plots import sweep_figure

# (head seed, sampling seed, t_max) -> (eval/fid, eval_unguided/fid): the unguided FID depends on the sampling seed only.
UNGUIDED = {0: 9.0, 1: 8.0}
GUIDED = {(0, 0, 0.2): 8.9, (0, 1, 0.2): 7.7, (1, 0, 0.2): 9.2, (1, 1, 0.2): 7.6,
          (0, 0, 1.0): 9.5, (0, 1, 1.0): 8.4, (1, 0, 1.0): 8.1, (1, 1, 1.0): 7.0}


def write_sweep(folder):
    """One job folder per GUIDED entry, with its resolved_config.yaml and metrics.json as run.py writes them."""
    for n, ((head, sampling, t_max), fid) in enumerate(GUIDED.items()):
        job = folder / f"{n}_job"
        job.mkdir(parents=True)
        cfg = {"discriminator": {"seed": head}, "metrics": {"sampling_seed": sampling}, "guidance": {"dg": {"t_max": t_max}}}
        OmegaConf.save(OmegaConf.create(cfg), job / "resolved_config.yaml")
        (job / "metrics.json").write_text(json.dumps({"eval/fid": fid, "eval_unguided/fid": UNGUIDED[sampling]}))


def cell(values, below=None):
    mean, std = statistics.mean(values), statistics.stdev(values)
    if below is None:
        return f"{mean:.4f} ± {std:.4f} (n={len(values)})"
    lo, hi = bootstrap_interval(values)
    return (f"{mean:.4f} ± {std:.4f} (n={len(values)}, {below} < 0; 95% CI [{lo:.4f}, {hi:.4f}]"
            + (", includes 0)" if lo <= 0 <= hi else ")"))


def test_paired_differences_pool_the_sampling_seeds_per_head_and_all_heads(tmp_path):
    write_sweep(tmp_path)
    report_main([str(tmp_path), "--metric", "eval/fid", "--minus", "eval_unguided/fid", "--rows", "discriminator.seed",
                 "--cols", "guidance.dg.t_max", "--all"])
    table = (tmp_path / "report.md").read_text().splitlines()
    delta = {key: fid - UNGUIDED[key[1]] for key, fid in GUIDED.items()}
    assert table[0] == ("| discriminator.seed | eval/fid - eval_unguided/fid (t_max=0.2) "
                        "| eval/fid - eval_unguided/fid (t_max=1.0) |")
    for line, head in zip(table[2:4], (0, 1)):
        per_window = [[delta[(head, s, t)] for s in (0, 1)] for t in (0.2, 1.0)]
        assert line == f"| {head} | " + " | ".join(cell(v, sum(x < 0 for x in v)) for v in per_window) + " |"
    pooled = [[delta[(h, s, t)] for h in (0, 1) for s in (0, 1)] for t in (0.2, 1.0)]
    assert table[4] == "| all | " + " | ".join(cell(v, sum(x < 0 for x in v)) for v in pooled) + " |"
    assert table[4].startswith("| all | -0.1500 ± 0.2646 (n=4, 3 < 0; 95% CI [") and len(table) == 5
    assert (tmp_path / "report.png").stat().st_size > 5000


def test_a_plain_metric_pools_without_a_count_and_without_an_all_row(tmp_path, capsys):
    write_sweep(tmp_path)
    report_main([str(tmp_path), "--metric", "eval/fid", "--rows", "metrics.sampling_seed", "--cols", "guidance.dg.t_max"])
    assert capsys.readouterr().out.endswith(f"wrote {tmp_path / 'report.md'} and {tmp_path / 'report.png'}\n")
    table = (tmp_path / "report.md").read_text().splitlines()
    assert table[2] == f"| 0 | {cell([8.9, 9.2])} | {cell([9.5, 8.1])} |" and len(table) == 4


@pytest.mark.parametrize("args, message", [
    (["--metric", "eval/kid"], "has no metric 'eval/kid'"),
    (["--metric", "eval/fid", "--minus", "eval_floor/fid"], "has no metric 'eval_floor/fid'"),
    (["--metric", "eval/fid", "--rows", "guidance.dg.weight"], "has no config key 'guidance.dg.weight'; give --rows"),
])
def test_a_missing_metric_or_config_key_is_named(tmp_path, args, message):
    write_sweep(tmp_path)
    with pytest.raises(KeyError, match=message):
        report_main([str(tmp_path), "--cols", "guidance.dg.t_max", *args])


def test_job_folders_without_metrics_are_listed_as_failed_or_running_with_why(tmp_path, capsys):
    write_sweep(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    jobs = {"8_broken": {"status": "failed", "error": "ValueError: bad shard"},
            "9_killed": {"status": "running", "pid": gone.pid, "host": socket.gethostname()}}
    for name, status in jobs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps(status))
    (tmp_path / "10_config_error" / ".hydra").mkdir(parents=True)
    (tmp_path / "plots").mkdir()  # not a job folder
    report_main([str(tmp_path), "--metric", "eval/fid", "--rows", "metrics.sampling_seed", "--cols", "guidance.dg.t_max"])
    expected = [
        "Not in the table (3 job folders without metrics.json):",
        f"- {tmp_path / '10_config_error'}: failed: no metrics.json; no run.json: it stopped before its first stage",
        f"- {tmp_path / '8_broken'}: failed: no metrics.json; ValueError: bad shard",
        f"- {tmp_path / '9_killed'}: failed: no metrics.json; process {gone.pid} on {socket.gethostname()} ended "
        "without finishing (killed?)",
    ]
    assert (tmp_path / "report.md").read_text().splitlines()[-4:] == expected
    assert "\n".join(expected) in capsys.readouterr().out


def add_floor(folder):
    """eval_floor/fid = 1 + sampling seed / 2 in every job of write_sweep."""
    for job in sorted(folder.glob("*/metrics.json")):
        sampling = OmegaConf.load(job.parent / "resolved_config.yaml").metrics.sampling_seed
        job.write_text(json.dumps({**json.loads(job.read_text()), "eval_floor/fid": 1.0 + sampling / 2}))


def test_the_baselines_are_the_no_dg_and_floor_metrics_every_job_records(tmp_path):
    """No DG: the mean of UNGUIDED over the jobs (half at each sampling seed), 0 as its own paired difference; the floor
    only once every job has it: mean 1.25, paired -7.25 = mean of 1 - 9 and 1.5 - 8."""
    write_sweep(tmp_path)
    jobs = load_jobs(tmp_path)
    assert baselines(jobs, "eval/fid") == {"no DG (baseline): 8.5": 8.5}
    assert baselines(jobs, "eval/fid", "eval_unguided/fid") == {"no DG (baseline): 0": 0.0}
    assert baselines(jobs, "eval_unguided/fid") == {} and baselines(jobs, "eval/kid") == {}
    add_floor(tmp_path)
    jobs = load_jobs(tmp_path)
    assert baselines(jobs, "eval/fid") == {"no DG (baseline): 8.5": 8.5, "real digits (floor): 1.25": 1.25}
    assert baselines(jobs, "eval/fid", "eval_unguided/fid") == {"no DG (baseline): 0": 0.0,
                                                                 "real digits (floor): -7.25": -7.25}


def test_the_sweep_figure_draws_the_baselines_as_horizontal_lines_and_names_the_axes_in_words(tmp_path):
    write_sweep(tmp_path)
    add_floor(tmp_path)
    jobs = load_jobs(tmp_path)
    rows = collect(jobs, "eval/fid", "discriminator.seed", "guidance.dg.t_max")
    fig = sweep_figure(pooled(rows), baselines(jobs, "eval/fid"), "FID of DG (trained)", "discriminator.seed",
                       "guidance.dg.t_max", tmp_path / "report.png")
    ax = fig.axes[0]
    flat = {line.get_label(): set(line.get_ydata()) for line in ax.get_lines() if len(set(line.get_ydata())) == 1}
    assert flat == {"no DG (baseline): 8.5": {8.5}, "real digits (floor): 1.25": {1.25}}
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == [
        "no DG (baseline): 8.5", "real digits (floor): 1.25", "t_max = 0.2", "t_max = 1.0"]
    assert ax.get_title().startswith("FID of DG (trained)\none line per DG window end (guidance.dg.t_max)\n")
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("discriminator.seed", "FID of DG (trained)")
    assert (tmp_path / "report.png").stat().st_size > 5000


def test_the_bootstrap_interval_has_the_normal_limit_and_its_degenerate_cases():
    """Percentile bootstrap of a mean: for n = 400 normal draws its half width approaches 1.96 s / sqrt(n) (the
    bootstrap's own spread at 10,000 resamples is ~1 %, the normal approximation's error smaller still at this n);
    equal values give a point; the interval holds the sample mean."""
    values = np.random.default_rng(3).normal(0.2, 1.0, size=400)
    lo, hi = bootstrap_interval(values)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert lo < values.mean() < hi
    assert abs((hi - lo) / 2 - half) < 0.05 * half and abs((lo + hi) / 2 - values.mean()) < 0.05 * half
    assert bootstrap_interval([0.3, 0.3, 0.3]) == (0.3, 0.3)
    assert bootstrap_interval([-1.0, 2.0]) == (-1.0, 2.0)  # every resample mean lies between the two
