"""Sweep report: a table and a plot of one metric of a Hydra multirun, by two swept config keys.

    python -m dg_lightning.report <sweep_dir> [--metric toy/swd_dg] [--rows guidance.dg.weight]
                                  [--cols guidance.dg.t_min] [--minus eval_unguided/fid] [--all]

Reads every job folder's resolved_config.yaml and metrics.json under <sweep_dir>; writes <sweep_dir>/report.md (a
Markdown table: one row per value of --rows, one column per value of --cols, then the job folders without metrics.json,
each as failed or running with its error from run.json) and <sweep_dir>/report.png (the metric against --rows, one line
per --cols value, with the no-DG baseline and the floor, where the jobs record them, as horizontal lines). Jobs that
share both values (they differ in other swept keys, e.g. seeds)
are pooled: a cell gives their mean ± sample std and their number n; with --all a last row pools each column (for
rows that are seeds, e.g. --rows discriminator.seed). With --minus, each job contributes its paired difference
metric - minus (e.g. eval/fid - eval_unguided/fid, DG against no DG from the same seeds), and a cell also counts the
jobs whose difference is below 0 and gives a bootstrap 95 % interval of the mean difference, saying when it holds 0.
"""

import argparse
import json
import statistics

import numpy as np
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from dg_lightning.config import ABSENT
from dg_lightning.plots import SETS, metric_words, short_key, split_metric, sweep_figure
from dg_lightning.runstatus import RUN_STATUS, read_status

ROWS, COLS = "guidance.dg.weight", "guidance.dg.t_min"  # the default swept keys: DG weight by window start
JOB_FILES = (".hydra", "resolved_config.yaml", RUN_STATUS)  # what makes a folder of the sweep a job's folder


def load_jobs(sweep_dir):
    """(job folder, resolved config, metrics) of every finished job of a sweep folder, in folder order."""
    jobs = [(f.parent, OmegaConf.load(f.parent / "resolved_config.yaml"), json.loads(f.read_text()))
            for f in sorted(Path(sweep_dir).glob("*/metrics.json"))]
    if not jobs:
        raise FileNotFoundError(f"no */metrics.json under {sweep_dir}: is it a finished Hydra multirun folder?")
    return jobs


def collect(jobs, metric, rows_key=ROWS, cols_key=COLS, minus=None):
    """(row value, column value, value) for every job of load_jobs, sorted; value is the job's metric, or its metric
    minus its `minus` metric."""
    rows = []
    for folder, cfg, metrics in jobs:
        for name in (metric, minus or metric):
            if name not in metrics:
                raise KeyError(f"{folder / 'metrics.json'} has no metric {name!r}; it has {sorted(metrics)}")
        keys = {key: OmegaConf.select(cfg, key, default=ABSENT) for key in (rows_key, cols_key)}
        missing = [key for key, value in keys.items() if value is ABSENT]
        if missing:
            raise KeyError(f"{folder / 'resolved_config.yaml'} has no config key {missing[0]!r}; "
                           "give --rows / --cols keys of the swept config, e.g. guidance.dg.weight")
        rows.append((keys[rows_key], keys[cols_key], metrics[metric] - (metrics[minus] if minus else 0.0)))
    return sorted(rows, key=lambda r: (order(r[0]), order(r[1]), r[2]))


def unfinished(sweep_dir):
    """[(job folder, why)] of the sweep's job folders without metrics.json, each failed (with run.json's error, or
    because its process ended without finishing) or still running."""
    found = []
    for folder in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir()):
        if (folder / "metrics.json").is_file() or not any((folder / name).exists() for name in JOB_FILES):
            continue
        status = read_status(folder) or {"status": "failed", "error": f"no {RUN_STATUS}: it stopped before its first stage"}
        why = f"{status['status']}: no metrics.json" + (f"; {status['error']}" if status.get("error") else "")
        found.append((folder, why))
    return found


def unfinished_text(jobs):
    """The report's lines on the jobs left out of the table (empty when there are none)."""
    if not jobs:
        return ""
    return f"\nNot in the table ({len(jobs)} job folders without metrics.json):\n" + \
        "".join(f"- {folder}: {why}\n" for folder, why in jobs)


BASELINES = {  # a DG set -> its baseline (no DG) and floor sets, as plots.SETS names them
    "eval": (("eval_unguided", "baseline"), ("eval_floor", "floor")),
    "dg": (("no_dg", "baseline"), ("floor", "floor")), "dg_optimal": (("no_dg", "baseline"), ("floor", "floor")),
}


def baselines(jobs, metric, minus=None):
    """{legend text: value} of a DG metric's no-DG and floor counterparts that every job records: their mean over the
    jobs, each job's minus its `minus` metric (so the no-DG line is at 0 for --minus its no-DG metric)."""
    sample_set, _, pattern = split_metric(metric)
    lines = {}
    for other, role in BASELINES.get(sample_set, ()):
        name = pattern.format(other)
        if all(name in metrics for _, _, metrics in jobs):
            value = statistics.mean(m[name] - (m[minus] if minus else 0.0) for _, _, m in jobs)
            lines[f"{SETS[other]} ({role}): {value:.4g}"] = value
    return lines


def order(value):
    """A sort key for config values: numbers by value, before anything else by its text (null, strings)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, value, "") if is_number else (1, 0, str(value))


def pooled(rows, pool_rows=False):
    """{(row value, column value): [values]}, plus ("all", column value) pooling each column's rows when pool_rows."""
    cells = defaultdict(list)
    for row, col, value in rows:
        cells[(row, col)].append(value)
        if pool_rows:
            cells[("all", col)].append(value)
    return cells


BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 10_000, 0


def bootstrap_interval(values, level=0.95, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """The percentile bootstrap interval (lo, hi) of the mean of `values` at `level`: the means of `resamples`
    resamples with replacement (a seeded generator, so a report is reproducible), cut at (1 - level) / 2 each side."""
    values = np.asarray(values, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = values[picks].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def cell_text(values, paired):
    """One value as it is; several as mean ± sample std (n), and for paired differences the count below 0 and the
    bootstrap 95 % interval of the mean, marked when it includes 0 (no sign of an effect at that level)."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    text = f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} (n={len(values)}"
    if not paired:
        return text + ")"
    lo, hi = bootstrap_interval(values)
    return text + f", {sum(v < 0 for v in values)} < 0; 95% CI [{lo:.4f}, {hi:.4f}]" + \
        (", includes 0)" if lo <= 0 <= hi else ")")


def metric_label(metric, minus=None, name=str):
    """The reported quantity's name: name(metric), or the paired difference "name(metric) - name(minus)"."""
    return f"{name(metric)} - {name(minus)}" if minus else name(metric)


def markdown_table(rows, metric, rows_key=ROWS, cols_key=COLS, minus=None, pool_rows=False):
    """A Markdown table: one row per rows_key value (then "all" with pool_rows), one column per cols_key value."""
    cells = pooled(rows, pool_rows)
    name = metric_label(metric, minus)
    cols = sorted({col for _, col, _ in rows}, key=order)
    lines = [f"| {rows_key} | " + " | ".join(f"{name} ({short_key(cols_key)}={c})" for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for row in sorted({row for row, _, _ in rows}, key=order) + (["all"] if pool_rows else []):
        texts = [cell_text(cells[(row, c)], minus is not None) if (row, c) in cells else "" for c in cols]
        lines.append(f"| {row} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Write report.md and report.png for a sweep folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--metric", default="toy/swd_dg")
    parser.add_argument("--rows", default=ROWS, help="config key of the table's rows, the plot's x")
    parser.add_argument("--cols", default=COLS, help="config key of the table's columns, plot's lines")
    parser.add_argument("--minus", default=None, help="a metric of the same job to subtract (a paired difference)")
    parser.add_argument("--all", action="store_true", help="add a row pooling all rows of each column")
    args = parser.parse_args(argv)
    left_out = unfinished_text(unfinished(args.sweep_dir))
    try:
        jobs = load_jobs(args.sweep_dir)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}{left_out}") from exc
    rows = collect(jobs, args.metric, args.rows, args.cols, args.minus)
    table = markdown_table(rows, args.metric, args.rows, args.cols, args.minus, args.all) + left_out
    markdown, figure = Path(args.sweep_dir) / "report.md", Path(args.sweep_dir) / "report.png"
    markdown.write_text(table)
    sweep_figure(pooled(rows), baselines(jobs, args.metric, args.minus), metric_label(args.metric, args.minus, metric_words),
                 args.rows, args.cols, figure)
    print(table)
    print(f"wrote {markdown} and {figure}")


if __name__ == "__main__":
    main()
