"""The run's console: Lightning's log records printed once, each known noise line dropped by its one named filter
(NOISE, with the reason it tells the user nothing), Lightning's per-Trainer hardware lines printed once (ONCE), and
the one line that says where a W&B run went.

Only the lines named here are dropped: every other warning and log record still shows.
"""

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

from dg_lightning.distributed import rank_and_world_size
from dg_lightning.plots import SETS, split_metric

RANK_ZERO = "lightning.pytorch.utilities.rank_zero"  # the logger of Lightning's rank_zero_info


@dataclass(frozen=True)
class Noise:
    """A known line that tells the user nothing: its name, a regex matching its message from the start, why it is
    noise, and the logger that emits it (None: it is a Python warning)."""

    name: str
    message: str
    why: str
    logger: str | None = None


NOISE = (
    Noise("litlogger tip", r"💡 Tip: For seamless cloud logging", "an advertisement Lightning logs for every Trainer",
          logger=RANK_ZERO),
    Noise("eval-mode modules", r"Found \d+ module\(s\) in eval mode at the start of training",
          "the frozen feature extractors, classifiers and EMA copies are in eval mode on purpose"),
    Noise("logging interval", r"The number of training batches \(\d+\) is smaller than the logging interval",
          "Lightning logs every log_every_n_steps global steps across epochs, so short epochs still log"),
    Noise("LeafSpec deprecation", r"`isinstance\(treespec, LeafSpec\)` is deprecated",
          "Lightning's own call of a torch pytree API that torch deprecated; nothing a run can change"),
)
# Lines Lightning logs for every Trainer (a pipeline may fit several): each distinct one is kept the first time only.
ONCE = {RANK_ZERO: r"(GPU|TPU|HPU) available: ", "lightning.pytorch.accelerators.cuda": r"LOCAL_RANK: \d+ - "}


class LogFilter(logging.Filter):
    """Drops a logger's records whose message matches a `drop` regex, and the repeats of those matching `once`."""

    def __init__(self, drop=(), once=None):
        super().__init__()
        self.drop, self.once, self.seen = [re.compile(d) for d in drop], once and re.compile(once), set()

    def filter(self, record):
        """False (dropped) for a noise record or a repeated once-record."""
        message = record.getMessage()
        if any(d.match(message) for d in self.drop):
            return False
        if self.once and self.once.match(message):
            if message in self.seen:
                return False
            self.seen.add(message)
        return True


FILTERS = {name: LogFilter([n.message for n in NOISE if n.logger == name], ONCE.get(name))
           for name in {*ONCE, *(n.logger for n in NOISE if n.logger)}}


def print_lightning_records_once():
    """Remove the console handler that `import lightning` puts on the "lightning" logger when the root logger has
    handlers (Hydra's): the records propagate to the root and were printed twice, plainly and in Hydra's format.
    Lightning does the same for its own "lightning.pytorch" logger."""
    lightning = logging.getLogger("lightning")
    if logging.getLogger().hasHandlers():
        for handler in [h for h in lightning.handlers if type(h) is logging.StreamHandler]:
            lightning.removeHandler(handler)


def quiet_console():
    """Print Lightning's records once and install the filters of NOISE and ONCE (calling it again changes nothing)."""
    print_lightning_records_once()
    for noise in NOISE:
        if noise.logger is None:
            warnings.filterwarnings("ignore", message=noise.message)
    for name, log_filter in FILTERS.items():
        logging.getLogger(name).addFilter(log_filter)


def wandb_lines(loggers):
    """One line per W&B run of these loggers (rank 0; W&B itself is silent): its URL, or for an offline run its
    folder and the command that uploads it; nothing for a disabled run."""
    if rank_and_world_size()[0] != 0:
        return []
    lines = []
    for run in (logger.experiment for logger in loggers if isinstance(logger, WandbLogger)):
        if run.disabled:
            continue
        if run.offline:
            lines.append(f"W&B offline run, to upload: wandb sync {Path(run.dir).parent}")
        else:
            lines.append(f"W&B run: {run.url}")
    return lines


HEADLINE = ("no DG", "DG (trained)", "DG with d*", "floor")  # the summary table's columns, in plots.SETS' words
FLOORS = ("floor", "eval_floor")  # the sets of real data scored against real data


def headline(metrics):
    """({quantity: {column: value}} of the metrics of the HEADLINE sets (plots.split_metric's set of a metric name),
    {name: value} of the others)."""
    table, others = {}, {}
    for name, value in sorted(metrics.items()):
        sample_set, quantity, _ = split_metric(name)
        column = "floor" if sample_set in FLOORS else SETS.get(sample_set)
        if column in HEADLINE:
            table.setdefault(quantity, {})[column] = value
        else:
            others[name] = value
    return table, others


def table_lines(table):
    """The headline table as aligned lines: a header of the columns present, then one row per metric ("-" where a
    column has no figure for it)."""
    columns = [column for column in HEADLINE if any(column in row for row in table.values())]
    rows = [["", *columns]] + [[metric, *(f"{row[c]:.4g}" if c in row else "-" for c in columns)]
                               for metric, row in table.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) + 1)]
    return ["  " + "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows]


def summary(cfg, out_dir, metrics, state="finished", runs=()):
    """The run's closing lines: the experiment and its folder, the headline table (DG against no DG and the floor),
    any other metric, the figures written there and the W&B lines `runs`."""
    table, others = headline(metrics)
    width = max(map(len, others), default=0)
    lines = [f"{cfg.experiment_name} {state}: {out_dir}", *(table_lines(table) if table else [])]
    lines += [f"  {name:<{width}}  {value:.4g}" for name, value in others.items()]
    figures = sorted(p.name for p in Path(out_dir).glob("*.png"))
    if figures:
        lines.append(f"  figures: {', '.join(figures)}")
    return "\n".join([*lines, *(f"  {line}" for line in runs)])
