"""The one G++ recipe: a pipeline is a list of declared stages, and one runner runs any of them.

A Stage declares its name, the config keys whose values determine its output (`keys`, fingerprinted), the config keys
it reads without their changing the output (`uses`, e.g. the guidance that only the sampling callback's logged figures
depend on), the config keys that hold the paths of files or folders it reads (`files`, fingerprinted by their content:
a released checkpoint replaced at the same path makes the stage again), the earlier stages whose folders it consumes
(`inputs`) and whether it runs for this config (`when`).
The runner gives every pipeline the same machinery:
- `stage=<name>` stops after that stage;
- each stage's cache folder paths.cache_dir/<experiment>/<stage>-<fingerprint>, the fingerprint a hash of the declared
  keys' resolved values, of its files' contents (a file's sha256, computed once per (path, size, mtime_ns) and kept in
  paths.cache_dir/file_hashes.json; a folder's listing of names, sizes and mtimes) and of the names of its inputs'
  folders (which hold their own fingerprints), so a stage is reused exactly when everything it depends on is the same;
  a stage sees the results and folders of its declared inputs only;
- each stage function sees the config through a view that holds only what the stage declares (and RUNTIME): reading
  any other key raises UndeclaredKeyError, so no stage depends on a key its fingerprint misses;
- resumption (a stage function finds its finished outputs or checkpoints in its folder), the loggers, metrics.json,
  stage_times.json (each stage's wall seconds in this run and whether it came from the cache) and the run folder's
  status marker run.json (running / failed / done, runstatus.py);
- a record of each run that uses a stage folder, in the folder's runs/ (what `python -m dg_lightning.cache` lists and
  how it tells a folder in use).
"""

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from dg_lightning.config import ConfigError
from dg_lightning.console import summary, wandb_lines
from dg_lightning.distributed import rank_and_world_size
from dg_lightning.files import atomic_save, content_id, write_atomic
from dg_lightning.loggers import build_loggers, finish_loggers
from dg_lightning.runstatus import run_status
from dg_lightning.training import selection_files, selection_keys

# Keys that decide how a stage runs, never what it computes: any stage may read them and none is fingerprinted by them.
RUNTIME = ("experiment_name", "pipeline", "stage", "paths", "logger", "callbacks", "checkpoints", "accel",
           "data.num_workers", "data.encode_batch_size", "metrics.batch_size", "metrics.sample_batch_size", "metrics.export")
TRAINING_LENGTH = ("trainer.max_epochs", "trainer.max_steps")  # the trainer's other keys are runtime too
STAGE_RECORD = "stage.json"  # written by the runner when a stage finished in its folder
FILE_HASHES = "file_hashes.json"  # in paths.cache_dir: {path: {size, mtime_ns, sha256}} of the files stages read
RUN_RECORDS = "runs"  # <stage folder>/runs/<run key>.json: a run that used the folder (its folder, host, process, time)
UNDECLARED = "dg_undeclared"


class UndeclaredKeyError(InterpolationResolutionError):
    """A stage read a config key that its declaration (keys or uses) omits (an OmegaConf resolution error, which
    OmegaConf raises as it is)."""


def _undeclared(stage, key):
    raise UndeclaredKeyError(f"stage {stage!r} read the config key {key!r}, which its declaration omits: add it to the "
                             "stage's keys (when it changes the stage's output) or uses (when it does not)")


OmegaConf.register_new_resolver(UNDECLARED, _undeclared, replace=True)


@dataclass(frozen=True)
class Stage:
    """One declared step of a pipeline: run(StageRun) -> its result (kept for later stages as results[name])."""

    name: str
    run: Callable[["StageRun"], Any]
    keys: tuple | Callable[[DictConfig], tuple] = ()
    uses: tuple = ()
    files: tuple | Callable[[DictConfig], tuple] = ()
    inputs: tuple = ()
    when: Callable[[DictConfig], bool] = lambda cfg: True

    def declared_keys(self, cfg: DictConfig):
        """The fingerprinted keys of this stage for cfg (keys may depend on the config, e.g. discriminator.select)."""
        return tuple(self.keys(cfg) if callable(self.keys) else self.keys)

    def declared_files(self, cfg: DictConfig):
        """The config keys of the files and folders this stage reads for cfg (fingerprinted by their content)."""
        return tuple(self.files(cfg) if callable(self.files) else self.files)


def train_stage(train, keys, scoring, files=(), scoring_files=(), inputs=()):
    """The train stage of a head trained with the guided-sampling callback: fingerprinted by `keys`, the training
    length and the callback's settings, and with discriminator.select=best by the guidance and the `scoring` keys and
    `scoring_files` too (its pick depends on them; training.selection_keys); it reads the guidance and the scoring keys
    either way (the callback samples and scores with them)."""
    return Stage("train", train, keys=lambda cfg: (*keys, *TRAINING_LENGTH, *selection_keys(cfg, scoring)),
                 uses=("guidance", *scoring), files=lambda cfg: (*files, *selection_files(cfg, scoring_files)),
                 inputs=inputs)


@dataclass(frozen=True)
class Pipeline:
    """A named list of stages (paper Algorithms 1 and 2) and the checks that run on the whole config before any."""

    name: str
    stages: tuple
    check: Callable[[DictConfig], None] = lambda cfg: None

    @property
    def stage_names(self):
        """The names `stage=` accepts, in running order."""
        return tuple(stage.name for stage in self.stages)


@dataclass
class StageRun:
    """What a stage function gets: the config view, its cache folder (made on first use), the run folder, the
    loggers, the results and folders of its declared inputs that ran, and the run's metrics (a stage adds its
    figures to them)."""

    cfg: DictConfig
    cache_folder: Path
    out_dir: Path
    loggers: list
    results: dict
    folders: dict
    metrics: dict = field(default_factory=dict)

    recorded: bool = False  # whether this run's use of the folder is recorded in it

    @property
    def folder(self):
        """The stage's cache folder, created and this run's use recorded in it (record_use) when the stage first
        uses it."""
        if not self.recorded:
            self.cache_folder.mkdir(parents=True, exist_ok=True)
            record_use(self.cache_folder, self.out_dir)
            self.recorded = True
        return self.cache_folder


def _select(cfg: DictConfig, key):
    """The resolved value at key (a plain container for a subtree), or the _ABSENT marker when cfg has no such key."""
    node = OmegaConf.select(cfg, key, default=_ABSENT)
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


_ABSENT = object()


def file_contents(cfg: DictConfig, keys):
    """{key: content id} of the file or folder at each config key (files.content_id: None for none; a file's hash is
    cached in paths.cache_dir/file_hashes.json)."""
    return {key: content_id(OmegaConf.select(cfg, key), Path(cfg.paths.cache_dir) / FILE_HASHES) for key in keys}


def fingerprint(cfg: DictConfig, keys, inputs=(), contents=None):
    """A short hash of the resolved values at `keys`, of the files' `contents` ({key: content id}, file_contents; a key
    without a file adds nothing) and of the names of the input folders (each a stage's own fingerprint, so the hash
    chains through every stage before)."""
    picked = {key: _select(cfg, key) for key in keys}
    picked = {key: value for key, value in picked.items() if value is not _ABSENT}
    present = {key: value for key, value in (contents or {}).items() if value is not None}
    if present:
        picked["files"] = present
    if inputs:
        picked["inputs"] = [Path(folder).name for folder in inputs]
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_dir(cfg: DictConfig, stage, keys, inputs=(), contents=None):
    """The cache folder of a stage for these keys, file contents and input folders:
    paths.cache_dir/<experiment>/<stage>-<fingerprint> (not created here)."""
    return Path(cfg.paths.cache_dir) / cfg.experiment_name / f"{stage}-{fingerprint(cfg, keys, inputs, contents)}"


def _covered(key, allowed):
    """Whether key is one of the allowed keys or lies under one."""
    return any(key == a or key.startswith(a + ".") for a in allowed)


def _restrict(node, prefix, allowed, stage):
    """A copy of the resolved container `node` at `prefix` with every leaf outside `allowed` replaced by an
    interpolation that raises UndeclaredKeyError when read."""
    if not isinstance(node, dict):
        return node if _covered(prefix, allowed) else f"${{{UNDECLARED}:{stage},{prefix}}}"
    if _covered(prefix, allowed):
        return node
    return {key: _restrict(value, f"{prefix}.{key}" if prefix else str(key), allowed, stage) for key, value in node.items()}


def config_view(cfg: DictConfig, stage, keys):
    """cfg as stage `stage` may see it: every key outside `keys`, RUNTIME and the trainer's runtime keys raises
    UndeclaredKeyError when read (also through .get, OmegaConf.select or to_container)."""
    trainer = [f"trainer.{k}" for k in cfg.get("trainer", {}) if f"trainer.{k}" not in TRAINING_LENGTH]
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return OmegaConf.create(_restrict(resolved, "", (*keys, *RUNTIME, *trainer), stage))


def save_json(obj, path):
    """Write obj as indented JSON to path, atomically (rank 0)."""
    atomic_save(obj, path, save=lambda o, f: f.write((json.dumps(o, indent=2, default=str) + "\n").encode()))


def write_metrics(out_dir, metrics):
    """Write metrics.json (flat keys, float values) into the run folder (rank 0); returns the path."""
    path = Path(out_dir) / "metrics.json"
    save_json({k: float(v) for k, v in sorted(metrics.items())}, path)
    return path


def finished_metrics(cfg: DictConfig):
    """The metrics of a finished run of this config in paths.output_dir (its metrics.json, when the resolved_config.yaml
    beside it matches this config up to the loggers, whose W&B group holds the launch time), else None: a re-launched
    sweep (the same hydra.sweep.dir) skips the points that finished."""
    out_dir = Path(cfg.paths.output_dir)
    metrics, saved = out_dir / "metrics.json", out_dir / "resolved_config.yaml"
    if not (metrics.is_file() and saved.is_file()):
        return None
    without_loggers = lambda c: {k: v for k, v in OmegaConf.to_container(c, resolve=True).items() if k != "logger"}
    if without_loggers(OmegaConf.load(saved)) != without_loggers(cfg):
        return None
    return json.loads(metrics.read_text())


def _external_launcher():
    """Whether the ranks were started outside this process (torchrun, SLURM srun/submitit, or Lightning's own launcher)."""
    return "LOCAL_RANK" in os.environ or SLURMEnvironment.detect() or TorchElasticEnvironment.detect()


def launch(cfg: DictConfig):
    """Start this run's ranks before the first stage when cfg.trainer.strategy is "ddp": every rank then runs the whole
    pipeline (sharded generation, DDP training, sharded sampling, synchronised metrics) in one process group.

    On one machine the other local ranks are this script started again by Lightning (as trainer.fit would); under
    torchrun or SLURM they exist already and only the process group is set up. A Hydra multirun on one machine cannot
    re-start its jobs, so it must get its ranks from SLURM (hydra/launcher=slurm) or use one process per point.
    """
    t = cfg.get("trainer") or {}
    if t.get("strategy", "auto") != "ddp" or torch.distributed.is_initialized():
        return
    if not _external_launcher() and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError("trainer.strategy", "ddp in a local Hydra multirun (-m) would start every rank on the whole "
                          "sweep again", "sweep with hydra/launcher=slurm (SLURM starts each point's ranks), or run the "
                          "points one by one without -m, or sweep on one device per point (trainer=default or gpu)")
    L.Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.get("num_nodes", 1), strategy="ddp").launch()


def run_pipeline(cfg: DictConfig, pipeline: Pipeline):
    """run_stages with the run folder's status marker (runstatus.run_status: run.json running, then done or failed).
    Returns the run's metrics."""
    with run_status(cfg.paths.output_dir):
        return run_stages(cfg, pipeline)


def run_stages(cfg: DictConfig, pipeline: Pipeline):
    """Run `pipeline`'s stages up to cfg.stage, each in its cache folder and through its config view, after the
    pipeline's own checks; then metrics.json and the loggers' final record. Returns the run's metrics."""
    if cfg.stage != "all" and cfg.stage not in pipeline.stage_names:
        raise ConfigError("stage", f"unknown stage {cfg.stage!r} for pipeline {pipeline.name}",
                          f"use all or one of {list(pipeline.stage_names)}")
    pipeline.check(cfg)
    finished = finished_metrics(cfg)  # a re-launched sweep skips its finished points
    if finished is not None:
        announce(summary(cfg, Path(cfg.paths.output_dir), finished, "had finished"))
        return finished
    launch(cfg)  # trainer.strategy=ddp: every rank runs the pipeline from here
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save(OmegaConf.to_yaml(cfg, resolve=True), out_dir / "resolved_config.yaml",
                save=lambda text, f: f.write(text.encode()))
    L.seed_everything(cfg.seed, verbose=False)
    loggers, results, folders, metrics, times = build_loggers(cfg), {}, {}, {}, {}
    for number, stage in enumerate(pipeline.stages, 1):
        banner = f"stage {number}/{len(pipeline.stages)} {stage.name}:"
        if not stage.when(cfg):
            announce(f"{banner} not needed for this config")
        else:
            keys, ran = stage.declared_keys(cfg), [name for name in stage.inputs if name in folders]
            contents = file_contents(cfg, stage.declared_files(cfg))
            folder = folders[stage.name] = stage_dir(cfg, stage.name, keys, [folders[name] for name in ran], contents)
            cached = (folder / STAGE_RECORD).is_file()
            announce(f"{banner} {'from the cache' if cached else 'running'} ({folder})")
            view = config_view(cfg, stage.name, (*keys, *stage.uses, *contents))
            start = time.perf_counter()
            results[stage.name] = stage.run(StageRun(view, folder, out_dir, loggers,
                                                     {name: results[name] for name in ran},
                                                     {name: folders[name] for name in ran}, metrics))
            times[stage.name] = {"seconds": time.perf_counter() - start, "cached": cached}
            if folder.is_dir() and not cached:
                record(folder, cfg, keys, [folders[name] for name in ran], contents)
        if stage.name == cfg.stage:
            break
    save_json(times, out_dir / "stage_times.json")
    write_metrics(out_dir, metrics)
    runs = wandb_lines(loggers)
    finish_loggers(loggers, metrics)
    announce(summary(cfg, out_dir, metrics, "finished", runs))
    return metrics


def announce(text):
    """Print text on rank 0 (the stage banners and the run's summary)."""
    if rank_and_world_size()[0] == 0:
        print(text, flush=True)


def record(folder, cfg: DictConfig, keys, inputs, contents):
    """Write the finished stage's record into its folder: the values of its declared keys, its files' content ids and
    its input folders (the runner's sign that the folder is complete, and what a person reads to know what made it)."""
    values = {key: _select(cfg, key) for key in keys}
    save_json({"keys": {k: v for k, v in values.items() if v is not _ABSENT}, "files": contents,
               "inputs": [Path(p).name for p in inputs]}, folder / STAGE_RECORD)


def record_use(folder, out_dir):
    """Record in folder/runs/ (rank 0) that the run with folder out_dir, in this process on this host, uses the stage
    folder now: one file per run folder, rewritten when that run is started again."""
    if rank_and_world_size()[0] != 0:
        return
    out_dir = str(Path(out_dir).resolve())
    use = {"out_dir": out_dir, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    (folder / RUN_RECORDS).mkdir(exist_ok=True)
    write_atomic(folder / RUN_RECORDS / f"{hashlib.sha256(out_dir.encode()).hexdigest()[:16]}.json",
                 lambda f: f.write((json.dumps(use, indent=2) + "\n").encode()))

