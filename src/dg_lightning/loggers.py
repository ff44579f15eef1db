"""The run's loggers: building and closing them, and a CSV logger that keeps the metrics.csv of a killed run and
continues it when the run resumes in the same folder."""

import csv
import os

import wandb
from hydra.utils import instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from dg_lightning.distributed import rank_and_world_size


class ResumableExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is kept (Lightning deletes it) and continued."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.resumed = False

    def _check_log_dir_exists(self) -> None:
        """Replaces Lightning's deletion of metrics.csv: keep the file and take its header as the known keys."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])

    def resume_at(self, step: int) -> None:
        """On the first call only, drop the kept rows with step >= step (those the resumed run logs again)."""
        if self.resumed:
            return
        self.resumed = True
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = [row for row in reader if float(row["step"]) < step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=reader.fieldnames)
            writer.writeheader()
            writer.writerows(rows)


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger (same arguments) writing through ResumableExperimentWriter, so a resumed run keeps the
    rows its killed part logged before the resumption step."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ResumableExperimentWriter:
        """The writer, created on first use as Lightning's CSVLogger.experiment does, but keeping metrics.csv."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumableExperimentWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        """Lightning's log_metrics; an explicit step first trims the kept rows from that step on (step None never)."""
        if step is not None:
            self.experiment.resume_at(step)
        super().log_metrics(metrics, step)


def build_loggers(cfg: DictConfig):
    """The configured Lightning loggers (CSV always; W&B offline), without the W&B ones when WANDB_MODE=disabled (a
    WandbLogger with offline: true would set WANDB_MODE=dryrun itself and write its run anyway)."""
    configs = (cfg.get("logger") or {}).values()
    if os.environ.get("WANDB_MODE") == "disabled":
        configs = [c for c in configs if not str(c.get("_target_", "")).endswith("WandbLogger")]
    return [instantiate(c) for c in configs]


def finish_loggers(loggers, metrics):
    """Log the final metrics to every logger and close W&B runs (so sweep jobs do not share one); rank 0 only."""
    if rank_and_world_size()[0] != 0:
        return
    for logger in loggers:
        logger.log_metrics(metrics)
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(metrics)
            wandb.finish()


class QuietWandbLogger(WandbLogger):
    """Lightning's WandbLogger (same arguments) without the `anonymous=None` it always hands to wandb.init, which
    wandb (>= 0.19) answers on every run with "The anonymous setting has no effect" (wandb's anonymous mode is gone)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous")
