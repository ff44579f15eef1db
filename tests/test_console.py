"""The console: the step-based progress bar's total and description, bars only on an interactive terminal, the
summary's headline table, the named noise filters, and `python run.py`'s console within its line budget."""

import logging
import re
import warnings

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from dg_lightning import console, progress
from dg_lightning.console import NOISE, RANK_ZERO, quiet_console, summary
from dg_lightning.callbacks import StepProgressBar
from dg_lightning.progress import track
from test_run import run_py


class Regression(L.LightningModule):
    """A one-weight model fitted to 6 rows in batches of 2 (3 batches an epoch)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.weight(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(6, 1)), batch_size=2)


def fitted_bar(tmp_path, **length):
    """A StepProgressBar after fitting Regression with the trainer length `length`, drawn as on a terminal."""
    bar = StepProgressBar()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[bar], default_root_dir=tmp_path, **length)
    trainer.fit(Regression())
    return bar.progress.tasks[bar.train_progress_bar_id]


@pytest.fixture
def terminal(monkeypatch):
    """The console counts as an interactive terminal."""
    monkeypatch.setattr(progress, "interactive", lambda: True)


def test_step_based_training_has_one_bar_of_max_steps_over_every_epoch(tmp_path, terminal):
    task = fitted_bar(tmp_path, max_steps=7, max_epochs=-1)  # epochs 0, 1 and 1 step of epoch 2
    assert (task.total, task.completed, task.description) == (7, 7, "train steps (epoch 2)")


def test_epoch_based_training_keeps_lightnings_bar_per_epoch(tmp_path, terminal):
    task = fitted_bar(tmp_path, max_epochs=2)
    assert (task.total, task.completed, task.description.strip()) == (3, 3, "Epoch 1/1")


def test_no_bar_is_drawn_off_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    items = [1, 2, 3]
    assert track(items, "loop") is items
    assert progress.bar().disable
    bar = StepProgressBar()
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=[bar],
              default_root_dir=tmp_path, max_steps=2).fit(Regression())
    assert bar.progress is None


def test_track_counts_to_its_total_on_a_terminal(terminal):
    assert list(track((i for i in range(3)), "loop", total=3)) == [0, 1, 2]


def test_summary_tables_dg_against_no_dg_and_the_floor(tmp_path):
    (tmp_path / "toy2d.png").write_bytes(b"")
    cfg = OmegaConf.create({"experiment_name": "toy2d"})
    toy = {"toy/swd_no_dg": 0.8, "toy/swd_dg": 0.5, "toy/swd_dg_optimal": 0.25, "toy/swd_floor": 0.125}
    assert summary(cfg, tmp_path, toy, runs=["W&B offline run"]).splitlines() == [
        f"toy2d finished: {tmp_path}",
        "       no DG  DG (trained)  DG with d*  floor",
        "  swd    0.8           0.5        0.25  0.125",
        "  figures: toy2d.png",
        "  W&B offline run",
    ]
    images = {"eval/fid": 12.5, "eval_unguided/fid": 14.0, "eval_floor/fid": 1.5, "eval/recall": 0.5,
              "eval_unguided/recall": 0.25, "sampling/best_epoch": 3, "toy/nfe_dg": 35}
    assert summary(cfg, tmp_path / "none", images, "had finished").splitlines() == [
        f"toy2d had finished: {tmp_path / 'none'}",
        "          no DG  DG (trained)  floor",
        "  fid        14          12.5    1.5",
        "  recall   0.25           0.5      -",
        "  nfe         -            35      -",
        "  sampling/best_epoch  3",
    ]


@pytest.fixture
def quiet(caplog):
    """quiet_console() under a root handler (caplog's, as Hydra's would be); Lightning's handler and the log filters
    are put back afterwards."""
    lightning = logging.getLogger("lightning")
    handlers = list(lightning.handlers)
    caplog.set_level(logging.INFO)
    quiet_console()
    yield caplog
    for name, log_filter in console.FILTERS.items():
        logging.getLogger(name).removeFilter(log_filter)
        log_filter.seen.clear()
    for handler in handlers:
        lightning.addHandler(handler)


def test_quiet_console_drops_each_noise_line_and_only_those(quiet):
    log = logging.getLogger(RANK_ZERO)
    for _ in range(2):
        log.info("GPU available: False, used: False")
    log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
    log.info("`Trainer.fit` stopped: `max_steps=30` reached.")
    assert [r.getMessage() for r in quiet.records] == ["GPU available: False, used: False",
                                                       "`Trainer.fit` stopped: `max_steps=30` reached."]
    assert not any(type(h) is logging.StreamHandler for h in logging.getLogger("lightning").handlers)
    with warnings.catch_warnings(record=True) as shown:
        for message in ("Found 2 module(s) in eval mode at the start of training. This may lead to ...",
                        "The number of training batches (1) is smaller than the logging interval Trainer(...)",
                        "`isinstance(treespec, LeafSpec)` is deprecated, use ...", "a warning of our own"):
            warnings.warn(message, UserWarning)
    assert [str(w.message) for w in shown] == ["a warning of our own"]


TINY = ["data.num_real=256", "data.num_fake=256", "data.batch_size=64", "sampler.num_steps=4", "trainer.max_steps=10",
        "discriminator.net.width=16", "discriminator.net.depth=2", "discriminator.net.time_dim=8",
        "metrics.num_samples=64", "metrics.num_projections=16"]
LINE_BUDGET = 14  # a run: 3 stage banners, Lightning's hardware and stop lines, the summary (5 lines)
SWEEP_LINE_BUDGET = 2 + 2 * 10  # Hydra's launch line; per point Hydra's line, 3 banners and the summary


def assert_quiet(output, budget, once=True):
    """The console output holds no known noise line and no line of W&B's own, fits the budget and (once) has no line
    twice."""
    lines = output.splitlines()
    assert len(lines) <= budget, output
    for noise in NOISE:
        assert not re.search(noise.message, output), f"{noise.name} printed:\n{output}"
    assert not [line for line in lines if line.startswith(("wandb:", "INFO:"))], output
    assert not once or len(set(lines)) == len(lines), output


def test_a_run_and_a_sweep_print_banners_tables_and_no_noise(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B on (files only), as a user's run has it
    paths = [f"paths.log_dir={tmp_path}/logs"]
    out = run_py(tmp_path, *paths, *TINY)
    output = out.stdout + out.stderr
    assert_quiet(output, LINE_BUDGET)
    assert re.search(r"stage 2/3 train: running \(.*train-\w+\)", output)
    assert re.search(r"^  swd +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+$", output, re.M), output
    assert "figures: toy2d.png" in output and output.count("W&B offline run, to upload: wandb sync") == 1

    sweep = run_py(tmp_path, "-m", "stage=sample", "guidance.dg.weight=0,1", *paths, *TINY)
    output = sweep.stdout + sweep.stderr
    assert_quiet(output, SWEEP_LINE_BUDGET, once=False)  # the points share the cached stages' banners
    assert output.count("stage 2/3 train: from the cache") == 2 and output.count("toy2d finished: ") == 2
    assert output.count("W&B offline run, to upload: wandb sync") == 2, output
