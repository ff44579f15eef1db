"""Test settings: W&B disabled, no network, a small thread count for 2-core machines."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _wandb_disabled(monkeypatch, tmp_path):
    """Every test runs with W&B disabled and writes nothing outside its tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
