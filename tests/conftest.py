"""Test settings: W&B disabled, no network, one torch thread (tiny ops run faster without thread hand-offs)."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)

def pytest_addoption(parser):
    """--published: also run the default digits run and compare it with docs/published.json (test_published)."""
    parser.addoption("--published", action="store_true", help="check the default digits run against docs/published.json")


HANG_GUARD_S = 3600  # subprocess time limit of the tests: a guard against a hang, far above any machine's run time


@pytest.fixture(autouse=True)
def _wandb_disabled(monkeypatch, tmp_path):
    """Every test runs with W&B disabled and writes nothing outside its tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


CONF_DIR = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture
def compose_cfg(tmp_path):
    """Compose the real Hydra config with overrides (outputs under tmp_path), as run.py would see it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    def _compose(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[f"paths.log_dir={tmp_path}/logs", f"paths.output_dir={tmp_path}/out", *overrides],
                          return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    return _compose
