"""The stage cache (paths.cache_dir): list its stage folders, and prune them by age or by stage.

    python -m dg_lightning.cache list [paths.cache_dir=DIR ...]
    python -m dg_lightning.cache prune [--older-than 7d] [--stage train ...] [--experiment toy2d] [--dry-run]
                                       [paths.cache_dir=DIR ...]

The cache folder is the project config's paths.cache_dir (the trailing key=value overrides are Hydra's, as for
run.py). A stage folder is <experiment>/<stage>-<fingerprint>; `list` gives its size, the config values that made it
(its stage.json) and the runs that used it (its runs/ records, pipelines.recipe.record_use), newest use last. `prune`
deletes the stage folders that match every filter given (last used longer ago than --older-than, one of the --stage
names, one of the --experiment names), except those in use by a process still running on this host; with --dry-run it
only says what it would delete. A pruned stage is computed again by the next run that needs it.
"""

import argparse
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from dg_lightning.config import compose_config
from dg_lightning.pipelines.recipe import RUN_RECORDS, STAGE_RECORD

STAGE_FOLDER = re.compile(r"(?P<stage>.+)-[0-9a-f]{16}")  # <stage>-<fingerprint>, as recipe.stage_dir names it
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class StageFolder:
    """One stage folder of the cache: where it is, its size in bytes, its record (None while unfinished), the runs
    that used it (oldest first) and when it was last used (seconds since the epoch)."""

    path: Path
    experiment: str
    stage: str
    size: int
    keys: dict | None
    runs: tuple
    last_used: float

    def running(self):
        """The runs that used the folder whose process still runs on this host."""
        return [run for run in self.runs if is_running(run)]


def is_running(run):
    """Whether the process of a run record is alive on this host (a record of another host cannot be checked: False)."""
    if run.get("host") != socket.gethostname():
        return False
    try:
        os.kill(run["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def folder_size(path: Path):
    """The bytes of the files under path (links not followed)."""
    return sum(os.lstat(os.path.join(root, name)).st_size for root, _, names in os.walk(path) for name in names)


def read_folder(path: Path):
    """The StageFolder at path: its stage.json's keys, its runs/ records and its last use (the newest of the records'
    times and the folder's and its record's modification times)."""
    record = path / STAGE_RECORD
    runs = sorted((json.loads(p.read_text()) for p in (path / RUN_RECORDS).glob("*.json")), key=lambda r: r["time"])
    times = [path.stat().st_mtime, *(r["time"] for r in runs), *([record.stat().st_mtime] if record.is_file() else [])]
    return StageFolder(path, path.parent.name, STAGE_FOLDER.fullmatch(path.name)["stage"], folder_size(path),
                       json.loads(record.read_text())["keys"] if record.is_file() else None, tuple(runs), max(times))


def stage_folders(cache_dir: Path):
    """Every stage folder under cache_dir (<experiment>/<stage>-<fingerprint>), sorted by path."""
    found = sorted(p for p in Path(cache_dir).glob("*/*") if p.is_dir() and STAGE_FOLDER.fullmatch(p.name))
    return [read_folder(p) for p in found]


def parse_age(text):
    """Seconds in an age such as 7d, 12h, 30m, 90s or 2w; ValueError naming --older-than otherwise."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if match is None:
        raise ValueError(f"--older-than {text!r} is not an age: give a number and a unit of {'/'.join(UNITS)}, e.g. 7d")
    return float(match[1]) * UNITS[match[2]]


def human(size):
    """A byte count in kB, MB or GB (powers of 1000), as du -sh --si writes it."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def when(seconds):
    """A time since the epoch as local YYYY-MM-DD HH:MM."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def describe(folder: StageFolder, now):
    """The lines `list` prints for one stage folder: path, size and last use, its keys, its runs."""
    days = (now - folder.last_used) / UNITS["d"]
    lines = [f"{folder.experiment}/{folder.path.name}  {human(folder.size)}  last used {when(folder.last_used)} "
             f"({days:.1f} days ago)"]
    lines.append("  keys: " + ("unfinished (no stage.json)" if folder.keys is None else
                               json.dumps(folder.keys, sort_keys=True, default=str)))
    for run in folder.runs:
        state = " (running: pid {pid} on {host})".format(**run) if is_running(run) else ""
        lines.append(f"  run: {run['out_dir']} at {when(run['time'])}{state}")
    return lines


def list_cache(folders, now):
    """The listing of the stage folders, and their total size."""
    lines = [line for folder in folders for line in describe(folder, now)]
    return "\n".join(lines + [f"{len(folders)} stage folders, {human(sum(f.size for f in folders))}"])


def prune(folders, now, older_than=None, stages=(), experiments=(), dry_run=False):
    """Delete (unless dry_run) the folders that match every filter given and that no process running on this host
    uses; returns the lines saying what was (or would be) deleted, what was kept in use, and the bytes freed."""
    matching = [f for f in folders if (older_than is None or now - f.last_used > older_than)
                and (not stages or f.stage in stages) and (not experiments or f.experiment in experiments)]
    lines, freed = [], 0
    for folder in matching:
        running = folder.running()
        if running:
            pids = ", ".join(str(run["pid"]) for run in running)
            lines.append(f"kept {folder.path}: in use by the running process {pids} (stop it, or prune later)")
            continue
        if not dry_run:
            shutil.rmtree(folder.path)
        freed += folder.size
        lines.append(f"{'would delete' if dry_run else 'deleted'} {folder.path} ({human(folder.size)})")
    lines.append(f"{'would free' if dry_run else 'freed'} {human(freed)}")
    return lines


def cache_dir(overrides):
    """paths.cache_dir of the project config with these Hydra overrides (absolute, from the current folder)."""
    return Path(compose_config(overrides).paths.cache_dir).resolve()


def main(argv=None):
    """The command line: list or prune the cache folder."""
    parser = argparse.ArgumentParser(prog="python -m dg_lightning.cache", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the stage folders, their size, keys and runs").add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. paths.cache_dir=/tmp/cache")
    pruning = commands.add_parser("prune", help="delete stage folders by age or stage")
    pruning.add_argument("--older-than", help="last used longer ago than this age, e.g. 7d, 12h, 30m")
    pruning.add_argument("--stage", action="append", default=[], help="a stage name, e.g. train (repeatable)")
    pruning.add_argument("--experiment", action="append", default=[], help="an experiment name (repeatable)")
    pruning.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    pruning.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. paths.cache_dir=/tmp/cache")
    args = parser.parse_args(argv)
    folder, now = cache_dir(args.overrides), time.time()
    if not folder.is_dir():
        parser.error(f"the cache folder {folder} (paths.cache_dir) does not exist: give paths.cache_dir=DIR")
    if args.command == "list":
        print(list_cache(stage_folders(folder), now))
        return
    if args.older_than is None and not args.stage:
        parser.error("prune needs --older-than AGE or --stage NAME (or both), so that it never deletes the whole cache "
                     "by accident")
    try:
        older_than = None if args.older_than is None else parse_age(args.older_than)
    except ValueError as e:
        parser.error(str(e))
    print("\n".join(prune(stage_folders(folder), now, older_than, args.stage, args.experiment, args.dry_run)))


if __name__ == "__main__":
    main()
