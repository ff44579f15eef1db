"""dg-lightning entry point: `python run.py experiment=<name> [key=value ...]` (Hydra; `-m` for sweeps)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from dg_lightning.pipeline import run

    run(cfg)


if __name__ == "__main__":
    main()
