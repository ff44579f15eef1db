"""dg-lightning entry point: `python run.py experiment=<name> [key=value ...]` (Hydra; `-m` for sweeps)."""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from dg_lightning.console import quiet_console
    from dg_lightning.pipelines import run

    quiet_console()  # after Hydra configured logging and lightning was imported
    try:
        run(cfg)
    except Exception:
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # Hydra reports a job's error only after the whole sweep
            logging.getLogger(__name__).exception("this sweep point failed; the sweep goes on and re-raises at its end")
        raise


if __name__ == "__main__":
    main()
