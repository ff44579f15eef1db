"""Sweep report: a table and a plot of one metric against the DG weight, one line per t_min.

    python -m dg_lightning.report <sweep_dir> [--metric toy/swd_dg]

Reads every job folder's resolved_config.yaml and metrics.json under <sweep_dir>; writes
<sweep_dir>/report.md (a Markdown table) and <sweep_dir>/report.png.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from dg_lightning.plots import sweep_figure


def collect(sweep_dir, metric):
    """(dg weight, t_min, value) for every finished job of a sweep folder, sorted."""
    rows = []
    for metrics_file in sorted(Path(sweep_dir).glob("*/metrics.json")):
        cfg = OmegaConf.load(metrics_file.parent / "resolved_config.yaml")
        metrics = json.loads(metrics_file.read_text())
        if metric not in metrics:
            raise KeyError(f"{metrics_file} has no metric {metric!r}; it has {sorted(metrics)}")
        rows.append((cfg.guidance.dg.weight, cfg.guidance.dg.t_min, metrics[metric]))
    if not rows:
        raise FileNotFoundError(f"no */metrics.json under {sweep_dir}: is it a finished Hydra multirun folder?")
    return sorted(rows)


def markdown_table(rows, metric):
    """A Markdown table: one row per DG weight, one column per t_min."""
    t_mins = sorted({t for _, t, _ in rows})
    values = defaultdict(dict)
    for weight, t_min, value in rows:
        values[weight][t_min] = value
    lines = ["| dg weight | " + " | ".join(f"{metric} (t_min={t})" for t in t_mins) + " |",
             "|---|" + "---|" * len(t_mins)]
    for weight in sorted(values):
        cells = [f"{values[weight][t]:.4f}" if t in values[weight] else "" for t in t_mins]
        lines.append(f"| {weight} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Write report.md and report.png for a sweep folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--metric", default="toy/swd_dg")
    args = parser.parse_args(argv)
    rows = collect(args.sweep_dir, args.metric)
    (Path(args.sweep_dir) / "report.md").write_text(markdown_table(rows, args.metric))
    sweep_figure(rows, args.metric, Path(args.sweep_dir) / "report.png")
    print(markdown_table(rows, args.metric))


if __name__ == "__main__":
    main()
