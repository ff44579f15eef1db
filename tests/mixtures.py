"""Mixture pairs for the Theorem-1 tests: the default toy pair (from the config) and another pair."""

from pathlib import Path

from omegaconf import OmegaConf

from dg_lightning.toy import GaussianMixture

CONF = Path(__file__).resolve().parents[1] / "conf"


def _from_config(path):
    node = OmegaConf.to_container(OmegaConf.load(CONF / path).mixture)
    node.pop("_target_")
    return GaussianMixture(**node)


def default_pair():
    """(data p, wrong model q) of experiment=toy2d."""
    return _from_config("data/toy_mixture.yaml"), _from_config("score/toy_mixture.yaml")


def other_pair():
    """A second pair: four overlapping modes on a ring; the model has reversed weights, wider modes and shifted means."""
    data = GaussianMixture(
        means=[[1.2, 0.0], [0.0, 1.2], [-1.2, 0.0], [0.0, -1.2]],
        covariances=[[[0.15, 0.05], [0.05, 0.1]], [[0.1, 0.0], [0.0, 0.2]], [[0.2, -0.05], [-0.05, 0.15]], [[0.1, 0.0], [0.0, 0.1]]],
        weights=[0.4, 0.3, 0.2, 0.1],
    )
    model = GaussianMixture(
        means=[[1.0, 0.3], [0.0, 1.2], [-1.5, 0.0], [0.3, -1.0]],
        covariances=[[[0.3, 0.0], [0.0, 0.3]]] * 4,
        weights=[0.1, 0.2, 0.3, 0.4],
    )
    return data, model
