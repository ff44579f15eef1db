"""Config checks that run before any compute: each error names the key and the fix."""

import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dg_lightning.metrics import INCEPTION_WEIGHTS_URL
from dg_lightning.module import LR_SCHEDULES

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the project's Hydra config, as run.py reads it
FEATURES = ("digits_classifier", "inception")
ABSENT = object()
SEEDS = ("seed", "discriminator.seed", "metrics.sampling_seed", "callbacks.sampling.seed")


class ConfigError(ValueError):
    """A bad configuration value: which key, what is wrong, how to fix it."""

    def __init__(self, key, problem, fix):
        super().__init__(f"config key '{key}': {problem}. Fix: {fix}")
        self.key = key


def compose_config(overrides):
    """The project config composed with these Hydra overrides (key=value strings), as run.py would see it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _require(condition, key, problem, fix):
    if not condition:
        raise ConfigError(key, problem, fix)


def validate(cfg: DictConfig):
    """Check the seeds, the guidance window and weights, the sampler's steps, the data sizes, the callbacks' targets,
    the metrics' feature network, every configured input path and the devices (the sampler's solver: sampling.check_sampler)."""
    missing = sorted(k for k in ("experiment_name", "pipeline") if OmegaConf.is_missing(cfg, k))
    _require(not missing, missing[0] if missing else "", "is not set", "choose an experiment, e.g. experiment=toy2d")
    for name, node in (cfg.get("callbacks") or {}).items():
        _require("_target_" in node, f"callbacks.{name}", "has settings but no _target_ (callbacks=none drops the "
                 "defaults, not the settings an experiment gives)", f"also drop it with ~callbacks.{name}")
    _validate_seeds(cfg)
    dg = cfg.guidance.dg
    _validate_window(cfg)
    for key in ("weight", "weight_2nd"):
        value = dg[key]
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0,
                 f"guidance.dg.{key}", f"must be a finite number >= 0, got {value!r}", "use 0 to switch DG off, 1-2 to guide")
    _require(dg.clip is None or 0.0 < dg.clip < 0.5, "guidance.dg.clip", f"must be null or in (0, 0.5), got {dg.clip}",
             "use null (log ratio = logit) or 1e-5 (the authors' clipping)")
    s = cfg.sampler
    _require("num_steps" not in s or s.num_steps >= 1, "sampler.num_steps", f"must be >= 1, got {s.get('num_steps')}",
             "EDM uses 18 (NFE 35)")
    _require("sigma_min" not in s or 0 < s.sigma_min < s.sigma_max, "sampler.sigma_min",
             f"needs 0 < sigma_min < sigma_max, got {s.get('sigma_min')}, {s.get('sigma_max')}",
             "EDM uses sigma_min=0.002, sigma_max=80")
    for key in ("rtol", "atol"):
        _require(key not in s or (_is_number(s[key]) and s[key] > 0), f"sampler.{key}",
                 f"the ODE solver's tolerance must be a finite number > 0, got {s.get(key)!r}", "score_sde uses 1e-5")
    _require("eps" not in s or (_is_number(s.eps) and _is_number(s.T) and 0 < s.eps < s.T <= 1), "sampler.eps",
             f"the PF-ODE runs from VP time T down to eps, needing 0 < eps < T <= 1, got T={s.get('T')}, "
             f"eps={s.get('eps')}", "score_sde uses T=1, eps=1e-3")
    _require(cfg.data.batch_size >= 2 and cfg.data.batch_size % 2 == 0, "data.batch_size",
             f"must be even and >= 2 (half real, half fake), got {cfg.data.batch_size}", "e.g. data.batch_size=128")
    _require(0.0 < cfg.data.t_min < 1.0, "data.t_min", f"training times live on [t_min, 1], got t_min={cfg.data.t_min}",
             "the paper uses 1e-5")
    for key, value in _paths(cfg.data, "data"):
        _require(Path(value).exists(), key, f"the data source {value} does not exist",
                 "point it at the real data (an .npz, an image folder, or a shard folder)")
    source = cfg.data.get("source")
    _require(source is None or Path(source).is_file(), "data.source", f"the data source {source} does not exist",
             "give an .npz with 'images' uint8 (N, 8, 8, 1) (NHWC) and integer 'labels' (N,), or null for sklearn's digits")
    _validate_counts(cfg)
    _validate_training(cfg.discriminator)
    _validate_selection(cfg)
    _validate_features(cfg.metrics)
    _validate_devices(cfg)


HELD_OUT_CALLBACK = "dg_lightning.held_out.HeldOutDiagnostics"


def _validate_window(cfg: DictConfig):
    """The DG window: 0 <= t_min < 1, and t_max a number in (t_min, 1] or auto; auto (read from the trained head's
    held-out figures) needs a head trained here with the held-out diagnostics and discriminator.select=last."""
    dg = cfg.guidance.dg
    _require(_is_number(dg.t_min) and 0.0 <= dg.t_min < 1.0, "guidance.dg.t_min",
             f"the DG window starts at a VP time in [0, 1), got t_min={dg.t_min!r}", "the paper uses 0.01")
    if dg.t_max != "auto":
        _require(_is_number(dg.t_max) and dg.t_min < dg.t_max <= 1.0, "guidance.dg.t_max",
                 f"must be auto or a number in (t_min, 1] = ({dg.t_min}, 1] in VP time, got {dg.t_max!r}",
                 "set guidance.dg.t_max=auto (from the head's held-out figures) or e.g. 1.0, above guidance.dg.t_min")
        return
    callbacks = [c.get("_target_") for c in (cfg.get("callbacks") or {}).values() if isinstance(c, DictConfig)]
    _require(HELD_OUT_CALLBACK in callbacks, "guidance.dg.t_max",
             "is auto, which reads the trained head's held-out figures, but no callback makes them",
             f"add callbacks.held_out (_target_: {HELD_OUT_CALLBACK}, conf/callbacks/default.yaml) or set a number")
    _require(OmegaConf.select(cfg, "trainer.max_epochs", default=1) != 0, "guidance.dg.t_max",
             "is auto, which reads the held-out figures of a head trained here, but trainer.max_epochs=0 trains none",
             "train the head (trainer.max_epochs >= 1) or set a number")
    _require(OmegaConf.select(cfg, "discriminator.select", default="last") == "last", "guidance.dg.t_max",
             "is auto, read from the trained head, but discriminator.select=best picks the head by guided samples "
             "that need the window first", "use discriminator.select=last with auto, or set a number")


def _is_number(value):
    """True for a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_seeds(cfg: DictConfig):
    """Every seed is an integer in [0, 2**32 - 1]: numpy's and Lightning's range; the training fakes are drawn above it
    (seeds.stream_base_seed)."""
    for key in SEEDS:
        value = OmegaConf.select(cfg, key, default=ABSENT)
        if value is ABSENT:  # a config without this key (e.g. no sampling callback)
            continue
        _require(not isinstance(value, bool) and isinstance(value, int) and 0 <= value <= 2**32 - 1, key,
                 f"must be an integer in [0, 2**32 - 1], got {value!r}", f"use e.g. {key}=0")


COUNTS = ("data.num_real", "data.num_fake", "data.num_held_out", "metrics.num_samples")  # sample counts (null: all, where allowed)
RATES = ("discriminator.lr", "score.lr", "discriminator.classifier.lr")


def _validate_counts(cfg: DictConfig):
    """Sample counts are integers >= 1 (or null), learning rates finite numbers > 0, checkpoints.keep >= -1,
    trainer.max_steps -1 (no limit) or >= 1: each checked only where the config has it."""
    for key in COUNTS:
        value = OmegaConf.select(cfg, key, default=None)
        _require(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1), key,
                 f"must be an integer >= 1, got {value!r}", f"e.g. {key}=1000")
    for key in RATES:
        value = OmegaConf.select(cfg, key, default=None)
        _require(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                   and math.isfinite(value) and value > 0), key,
                 f"must be a finite number > 0, got {value!r}", f"e.g. {key}=3e-4")
    keep = OmegaConf.select(cfg, "checkpoints.keep", default=-1)
    _require(isinstance(keep, int) and not isinstance(keep, bool) and keep >= -1, "checkpoints.keep",
             f"must be an integer >= -1 (-1 keeps every epoch checkpoint), got {keep!r}", "e.g. checkpoints.keep=1")
    steps = OmegaConf.select(cfg, "trainer.max_steps", default=-1)
    _require(isinstance(steps, int) and (steps == -1 or steps >= 1), "trainer.max_steps",
             f"must be -1 (no limit) or >= 1, got {steps!r}", "use trainer.max_epochs to bound training by epochs")


def _validate_training(discriminator):
    """discriminator.lr_schedule names a schedule of module.LR_SCHEDULES; discriminator.ema_decay is null or in (0, 1)."""
    schedule = discriminator.lr_schedule
    _require(schedule in LR_SCHEDULES, "discriminator.lr_schedule", f"unknown schedule {schedule!r}",
             f"use one of {', '.join(LR_SCHEDULES)}")
    decay = discriminator.ema_decay
    _require(decay is None or (_is_number(decay) and 0.0 < decay < 1.0), "discriminator.ema_decay",
             f"must be null (no EMA) or a number in (0, 1), got {decay!r}", "e.g. discriminator.ema_decay=0.999, or null")


SAMPLING_CALLBACK = "dg_lightning.callbacks.GuidedSamplingCallback"
SAMPLING_METRICS = ("fid", "precision", "recall", "kid", "is", "sfid", "swd")  # what the experiments' metric stacks compute


def _validate_selection(cfg: DictConfig):
    """callbacks.sampling monitors a metric that some experiment computes, in mode min or max; discriminator.select is
    last or best, and best needs the sampling callback and a head trained here."""
    sampling = (cfg.get("callbacks") or {}).get("sampling")
    if isinstance(sampling, DictConfig):
        _require(sampling.get("monitor", "fid") in SAMPLING_METRICS, "callbacks.sampling.monitor",
                 f"unknown metric {sampling.get('monitor')!r}", f"use one of {', '.join(SAMPLING_METRICS)} (what the "
                 "experiment computes: toy2d swd; digits fid, precision, recall, kid, is; EDM fid (precision, recall with data.path); "
                 "ImageNet fid, sfid, is, precision, recall)")
        _require(sampling.get("mode", "min") in ("min", "max"), "callbacks.sampling.mode",
                 f"must be min or max, got {sampling.get('mode')!r}", "min for fid, sfid, kid, swd; max for is, precision, recall")
    select = OmegaConf.select(cfg, "discriminator.select", default="last")
    _require(select in ("last", "best"), "discriminator.select", f"must be last or best, got {select!r}",
             "last: the last epoch's head; best: the epoch whose guided samples scored best")
    if select == "best":
        _require(isinstance(sampling, DictConfig) and sampling.get("_target_") == SAMPLING_CALLBACK,
                 "discriminator.select", "is best, which picks the epoch by the guided-sampling callback's scores, "
                 "but callbacks.sampling is not configured", f"configure callbacks.sampling (_target_: "
                 f"{SAMPLING_CALLBACK}, conf/callbacks/default.yaml) or use discriminator.select=last")
        _require(OmegaConf.select(cfg, "trainer.max_epochs", default=1) != 0, "discriminator.select",
                 "is best, but trainer.max_epochs=0 trains no head to pick an epoch of", "use discriminator.select=last")


GPU_ACCELERATORS = ("gpu", "cuda")  # trainer.accelerator values that put the networks on a CUDA device
GPU_ONLY_ACCEL = ("compile", "autocast")  # accel settings of the GPU fast path that the CPU cannot take


def _validate_devices(cfg: DictConfig):
    """trainer.accelerator gpu / cuda needs a CUDA device on this machine, and accel's GPU fast path (torch.compile,
    autocast) needs the networks on one (on the CPU, torch.compile builds C++ kernels: a compiler error, or a hang)."""
    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default="cpu")
    on_gpu = accelerator in GPU_ACCELERATORS
    _require(not on_gpu or torch.cuda.is_available(), "trainer.accelerator",
             f"is {accelerator} but this machine has no CUDA device (torch.cuda.is_available() is False)",
             "use trainer=default (the CPU) here, or run on a machine with a CUDA GPU")
    fast = [f"accel.{key}={cfg.accel[key]}" for key in GPU_ONLY_ACCEL if (cfg.get("accel") or {}).get(key) is not None]
    _require(not fast or on_gpu, "accel", f"sets {', '.join(fast)} (the GPU fast path) but the networks run on the CPU "
             f"(trainer.accelerator={accelerator})", "use accel=none on the CPU, or trainer=gpu on a machine with CUDA")


def require_count(key, wanted, found, where):
    """ConfigError when the sample count `wanted` at config key `key` (null: all) is more than the `found` that
    `where` holds (a larger count would silently use what there is)."""
    _require(wanted is None or wanted <= found, key, f"asks for {wanted} samples but {where} holds only {found}",
             f"set {key}={found} or fewer, or {key}=null to use all {found}")


def require_held_out(num_held_out, num_real, where):
    """ConfigError when the data.num_held_out reals held out of training leave none of the num_real reals of `where`
    to train on."""
    _require(num_held_out < num_real, "data.num_held_out", f"holds out {num_held_out} of the {num_real} real samples "
             f"of {where} (the last ones), leaving none to train the discriminator on",
             f"set data.num_held_out below {num_real} (e.g. {max(1, num_real // 10)})")


def _validate_features(metrics):
    """metrics.features names a known feature network; Inception needs its weights file on disk (nothing is downloaded)."""
    features = metrics.get("features")
    if features is None:
        return
    _require(features in FEATURES, "metrics.features", f"unknown feature network {features!r}", f"use one of {FEATURES}")
    if features == "inception":
        path = metrics.get("inception_path")
        _require(path is not None and Path(path).is_file(), "metrics.inception_path",
                 f"metrics.features=inception needs the Inception weights file, but {path} does not exist",
                 f"download {INCEPTION_WEIGHTS_URL} and set metrics.inception_path to its local path")


def _paths(node, prefix):
    """(key, value) of every config entry named *path or *_dir under node (the inputs a stage will read)."""
    for key, value in node.items():
        full = f"{prefix}.{key}"
        if isinstance(value, DictConfig):
            yield from _paths(value, full)
        elif isinstance(key, str) and key.endswith(("path", "_dir")) and value is not None:
            yield full, value
