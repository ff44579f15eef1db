"""ResumableCSVLogger: a resumed run keeps the rows its killed part logged before the resumption step; WANDB_MODE=disabled
builds no W&B logger."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from dg_lightning.loggers import QuietWandbLogger, ResumableCSVLogger, build_loggers


class TinyRegression(L.LightningModule):
    """A linear fit of fixed data by SGD, logging the loss every step."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        """Mean squared error of the linear map on the batch."""
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        """Plain SGD."""
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader():
    """One full batch of fixed data per epoch (every checkpoint is then at an epoch boundary)."""
    x = torch.linspace(-1, 1, 16).reshape(8, 2)
    y = x @ torch.tensor([[1.5], [-0.5]]) + 0.3
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def fit(folder, max_steps, callbacks=(), ckpt_path=None):
    """Fit a seeded TinyRegression for max_steps on CPU, logging to ResumableCSVLogger(folder)."""
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=ResumableCSVLogger(folder, name="", version=""),
                        callbacks=list(callbacks), log_every_n_steps=1, enable_checkpointing=bool(callbacks),
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyRegression(), loader(), ckpt_path=ckpt_path)


def read(folder):
    """The header and rows of folder/metrics.csv."""
    with open(folder / "metrics.csv", newline="") as file:
        reader = csv.DictReader(file)
        return reader.fieldnames, list(reader)


def test_resumed_logger_keeps_the_rows_before_its_first_step_and_appends(tmp_path):
    fit(tmp_path, max_steps=6)
    _, old = read(tmp_path)
    assert [int(r["step"]) for r in old] == list(range(6))
    k = 3
    logger = ResumableCSVLogger(tmp_path, name="", version="", flush_logs_every_n_steps=1)  # saves after every call
    new_loss = [10.0 + s for s in range(k, 8)]
    for s, loss in zip(range(k, 8), new_loss):
        logger.log_metrics({"loss": loss, "epoch": 0}, step=s)
    logger.finalize("success")
    _, rows = read(tmp_path)
    assert rows[:k] == old[:k]
    assert [int(r["step"]) for r in rows] == list(range(8))
    assert [float(r["loss"]) for r in rows[k:]] == new_loss


def test_rows_with_step_none_trim_nothing(tmp_path):
    fit(tmp_path, max_steps=4)
    _, old = read(tmp_path)
    logger = ResumableCSVLogger(tmp_path, name="", version="")
    logger.log_metrics({"loss": 0.5})  # as loggers.finish_loggers logs the final metrics
    logger.finalize("success")
    _, rows = read(tmp_path)
    assert rows[:-1] == old
    assert rows[-1] == {"epoch": "", "loss": "0.5", "step": "0"}


def test_new_keys_extend_the_header_and_old_rows_keep_their_values(tmp_path):
    first = ResumableCSVLogger(tmp_path, name="", version="")
    for s in range(5):
        first.log_metrics({"loss": float(s)}, step=s)
    first.finalize("success")
    resumed = ResumableCSVLogger(tmp_path, name="", version="")
    for s in range(2, 4):
        resumed.log_metrics({"loss": -float(s), "lr": 0.1}, step=s)
    resumed.finalize("success")
    header, rows = read(tmp_path)
    assert header == ["loss", "lr", "step"]
    assert rows == [{"loss": "0.0", "lr": "", "step": "0"}, {"loss": "1.0", "lr": "", "step": "1"},
                    {"loss": "-2.0", "lr": "0.1", "step": "2"}, {"loss": "-3.0", "lr": "0.1", "step": "3"}]


def test_fresh_folder_writes_what_lightnings_logger_writes(tmp_path):
    for cls, folder in ((CSVLogger, tmp_path / "lightning"), (ResumableCSVLogger, tmp_path / "ours")):
        logger = cls(folder, name="", version="", flush_logs_every_n_steps=2)
        logger.log_hyperparams({"lr": 0.1, "net": {"width": 8}})
        for s in range(3):
            logger.log_metrics({"loss": 1.0 / (s + 1)}, step=s)
        logger.log_metrics({"loss": 0.1, "acc": 0.9}, step=3)  # a new key after a flush
        logger.log_metrics({"fid": 2.0})
        logger.finalize("success")
    for name in ("metrics.csv", "hparams.yaml"):
        assert (tmp_path / "ours" / name).read_text() == (tmp_path / "lightning" / name).read_text()


def test_trainer_resumed_from_a_mid_run_checkpoint_logs_the_uninterrupted_rows(tmp_path):
    fit(tmp_path / "whole", max_steps=6)
    checkpoint = lambda: ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    fit(tmp_path / "resumed", max_steps=5, callbacks=[checkpoint()])  # "killed" after step 5: its rows 3, 4 are redone
    resume_from = tmp_path / "ckpt" / "epoch=2-step=3.ckpt"
    fit(tmp_path / "resumed", max_steps=6, callbacks=[checkpoint()], ckpt_path=resume_from)
    _, whole = read(tmp_path / "whole")
    _, resumed = read(tmp_path / "resumed")
    assert [int(r["step"]) for r in resumed] == [int(r["step"]) for r in whole] == list(range(6))
    assert [float(r["loss"]) for r in resumed] == [float(r["loss"]) for r in whole]


@pytest.mark.parametrize("mode, kinds", [("disabled", [ResumableCSVLogger]), ("offline", [ResumableCSVLogger, QuietWandbLogger])])
def test_wandb_mode_disabled_wins_over_the_logger_configs_offline_flag(compose_cfg, monkeypatch, mode, kinds):
    monkeypatch.setenv("WANDB_MODE", mode)
    cfg = compose_cfg("logger=default")
    assert cfg.logger.wandb.offline is True
    assert [type(logger) for logger in build_loggers(cfg)] == kinds
