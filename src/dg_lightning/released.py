"""Released files: the checks that every file a run reads exists (naming the key, the file and where it comes from)
and that a statistics file holds its arrays, before any compute, and DG's discriminator on a released ADM classifier
(EDM-G++, DiT-XL/2-G++, ADM-G++)."""

import zipfile
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dg_lightning.checkpoints import ADM_CLASSIFIERS, load_adm_classifier, load_dg_discriminator
from dg_lightning.config import ConfigError
from dg_lightning.nets.adm import Discriminator
from dg_lightning.training import build_network

FID_REFS_SOURCE = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/ (cifar10-32x32.npz, ffhq-64x64.npz)"
DISCRIMINATOR_FILES = ("discriminator.classifier.path", "discriminator.head_path")  # the files dg_discriminator reads


def require_released(cfg: DictConfig, files):
    """Raise a ConfigError for the first {config key: where to get it} whose file or folder does not exist."""
    for key, source in files.items():
        path = OmegaConf.select(cfg, key)
        if path is None or not Path(path).exists():
            raise ConfigError(key, f"the file or folder {path} does not exist", f"download it from {source} into "
                              f"paths.released_dir ({OmegaConf.select(cfg, 'paths.released_dir')}) or set {key}=/path/to/it")


def require_arrays(cfg: DictConfig, key, names, source):
    """Raise a ConfigError unless the .npz at config key `key` holds the arrays `names` (from its listing: no array is
    read), naming the file, what it lacks and where the right one comes from."""
    path = OmegaConf.select(cfg, key)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(key, f"cannot read {path} as an .npz ({type(exc).__name__}: {exc})",
                          f"download it again from {source}") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ConfigError(key, f"{path} is a single .npy array, not an .npz with the arrays {list(names)}",
                          f"give the .npz from {source}")
    with npz:
        missing = [name for name in names if name not in npz.files]
        if missing:
            raise ConfigError(key, f"{path} lacks the arrays {missing} (it has {sorted(npz.files)})",
                              f"give an .npz with the arrays {list(names)}, e.g. the one from {source}")


def check_discriminator_config(cfg: DictConfig, released_head):
    """ConfigError for an unknown ADM classifier, a head whose num_classes disagrees with discriminator.conditional, or
    no discriminator to guide with (trainer.max_epochs=0 and no head_path; released_head names the file to give)."""
    d = cfg.discriminator
    if d.classifier.config not in ADM_CLASSIFIERS:
        raise ConfigError("discriminator.classifier.config", f"unknown ADM classifier {d.classifier.config!r}",
                          f"use one of {sorted(ADM_CLASSIFIERS)}")
    if d.conditional != (d.head.num_classes is not None):
        raise ConfigError("discriminator.head.num_classes", f"is {d.head.num_classes} but discriminator.conditional is "
                          f"{d.conditional}", "a conditional head takes num_classes=1000 (the released layout), an "
                          "unconditional one null")
    if cfg.trainer.max_epochs == 0 and d.head_path is None:
        raise ConfigError("trainer.max_epochs", "is 0 (train nothing) but discriminator.head_path is null, so there is no "
                          "discriminator to guide with", f"give a released head (discriminator.head_path=.../{released_head}) "
                          "or train one (trainer.max_epochs > 0)")


def dg_discriminator(cfg: DictConfig, classifier_path=None):
    """DG's discriminator on the released ADM classifier (frozen; at classifier_path, default
    discriminator.classifier.path) with the released head at discriminator.head_path or a new head
    (discriminator.head, initialised from discriminator.seed); the head is trainable."""
    d = cfg.discriminator
    path = d.classifier.path if classifier_path is None else classifier_path
    overrides = OmegaConf.to_container(d.classifier.overrides, resolve=True)
    if d.head_path is not None:
        net = load_dg_discriminator(path, d.head_path, d.classifier.config, d.head.num_classes, **overrides)
    else:
        extractor = load_adm_classifier(path, d.classifier.config, **overrides)
        head = build_network(cfg, d.head, d.seed)
        net = Discriminator(extractor, head, ADM_CLASSIFIERS[d.classifier.config].time_map)
    net.head.requires_grad_(True)
    return net
