"""python -m dg_lightning.cache: the runner records each run's use of a stage folder; list gives each folder's size,
keys and runs; prune deletes by age and stage (or says what it would), never a folder a running process uses."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dg_lightning import cache
from dg_lightning.pipelines.recipe import Pipeline, Stage, run_pipeline

DAY = 86400
NOW = time.time()


def dead_pid():
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def stage_folder(cache_dir, name, size, keys=None, runs=(), age_days=0.0):
    """A stage folder of `size` bytes (one file), its stage.json when keys is given, run records (out_dir, pid, age in
    days) and a modification time age_days ago."""
    folder = cache_dir / name
    (folder / "runs").mkdir(parents=True)
    (folder / "data.bin").write_bytes(b"x" * size)
    if keys is not None:
        (folder / "stage.json").write_text(json.dumps({"keys": keys, "inputs": []}))
    for number, (out_dir, pid, days) in enumerate(runs):
        record = {"out_dir": out_dir, "host": socket.gethostname(), "pid": pid, "time": NOW - days * DAY}
        (folder / "runs" / f"{number}.json").write_text(json.dumps(record))
    for path in [*folder.rglob("*"), folder / "runs", folder]:
        os.utime(path, (NOW - age_days * DAY, NOW - age_days * DAY))
    return folder


@pytest.fixture
def tmp_cache(tmp_path):
    """toy2d/train (10 days unused, a finished run), toy2d/generate (in use by this process), digits/sample
    (unfinished, 8 days old, no runs)."""
    root = tmp_path / "cache"
    stage_folder(root, "toy2d/train-0123456789abcdef", 2_500_000, {"seed": 0, "trainer.max_steps": 2000},
                 [("/runs/a", dead_pid(), 12), ("/runs/b", dead_pid(), 10)], age_days=12)
    stage_folder(root, "toy2d/generate-fedcba9876543210", 1_000_000, {"seed": 0}, [("/runs/c", os.getpid(), 20)],
                 age_days=20)
    stage_folder(root, "digits_edm_g++/sample-00000000aaaaaaaa", 10, age_days=8)
    (root / "toy2d" / "not-a-stage").mkdir()  # no fingerprint: not listed, never pruned
    return root


def test_list_gives_each_stage_folders_size_keys_and_runs(tmp_cache):
    listing = cache.list_cache(cache.stage_folders(tmp_cache), NOW).splitlines()
    assert listing[0].startswith("digits_edm_g++/sample-00000000aaaaaaaa  10 B  last used ")
    assert listing[0].endswith("(8.0 days ago)") and listing[1] == "  keys: unfinished (no stage.json)"
    assert listing[2].startswith("toy2d/generate-fedcba9876543210  1.0 MB") and listing[3] == '  keys: {"seed": 0}'
    assert listing[4].startswith("  run: /runs/c at ")
    assert listing[4].endswith(f"(running: pid {os.getpid()} on {socket.gethostname()})")
    # The train folder was last used by run b, 10 days ago (its files are older).
    assert listing[5].startswith("toy2d/train-0123456789abcdef  2.5 MB") and listing[5].endswith("(10.0 days ago)")
    assert listing[6] == '  keys: {"seed": 0, "trainer.max_steps": 2000}'
    assert [line.split(" at ")[0] for line in listing[7:9]] == ["  run: /runs/a", "  run: /runs/b"]
    assert "running" not in listing[7] + listing[8]
    assert listing[9:] == ["3 stage folders, 3.5 MB"]


def test_prune_by_age_dry_run_deletes_nothing_then_deletes_the_old_folders_but_not_one_in_use(tmp_cache):
    old = [tmp_cache / "digits_edm_g++" / "sample-00000000aaaaaaaa", tmp_cache / "toy2d" / "train-0123456789abcdef"]
    in_use = tmp_cache / "toy2d" / "generate-fedcba9876543210"
    lines = cache.prune(cache.stage_folders(tmp_cache), NOW, older_than=7 * DAY, dry_run=True)
    assert lines == [f"would delete {old[0]} (10 B)",
                     f"kept {in_use}: in use by the running process {os.getpid()} (stop it, or prune later)",
                     f"would delete {old[1]} (2.5 MB)", "would free 2.5 MB"]
    assert all(path.is_dir() for path in [*old, in_use])

    lines = cache.prune(cache.stage_folders(tmp_cache), NOW, older_than=7 * DAY)
    assert lines[0] == f"deleted {old[0]} (10 B)" and lines[-1] == "freed 2.5 MB"
    assert not any(path.exists() for path in old) and in_use.is_dir() and (tmp_cache / "toy2d" / "not-a-stage").is_dir()


def test_prune_by_stage_and_experiment_deletes_only_the_matching_folders(tmp_cache):
    assert cache.prune(cache.stage_folders(tmp_cache), NOW, older_than=25 * DAY) == ["freed 0 B"]  # none so old
    lines = cache.prune(cache.stage_folders(tmp_cache), NOW, stages=["train", "sample"], experiments=["toy2d"])
    assert lines == [f"deleted {tmp_cache / 'toy2d' / 'train-0123456789abcdef'} (2.5 MB)", "freed 2.5 MB"]
    assert [f.path.name for f in cache.stage_folders(tmp_cache)] == ["sample-00000000aaaaaaaa",
                                                                     "generate-fedcba9876543210"]


def test_the_command_line_reads_paths_cache_dir_and_refuses_a_prune_without_a_filter(tmp_cache, capsys):
    cache.main(["prune", "--older-than", "9d", "--stage", "train", "--dry-run", f"paths.cache_dir={tmp_cache}"])
    assert capsys.readouterr().out.splitlines() == [
        f"would delete {tmp_cache / 'toy2d' / 'train-0123456789abcdef'} (2.5 MB)", "would free 2.5 MB"]
    cache.main(["list", f"paths.cache_dir={tmp_cache}"])
    assert capsys.readouterr().out.splitlines()[-1] == "3 stage folders, 3.5 MB"
    for argv, message in [(["prune", f"paths.cache_dir={tmp_cache}"], "prune needs --older-than AGE or --stage NAME"),
                          (["prune", "--older-than", "7 days", f"paths.cache_dir={tmp_cache}"],
                           "--older-than '7 days' is not an age: .* e.g. 7d"),
                          (["list", f"paths.cache_dir={tmp_cache / 'none'}"],
                           f"the cache folder {tmp_cache / 'none'} .paths.cache_dir. does not exist")]:
        with pytest.raises(SystemExit):
            cache.main(argv)
        assert re.search(message, capsys.readouterr().err), message


def test_the_runner_records_each_runs_use_of_the_stage_folders_it_opens(tmp_path):
    def make(run):
        (run.folder / "out.txt").write_text("done")

    pipeline = Pipeline("unit", (Stage("a", make, keys=("seed",)), Stage("b", lambda run: None, keys=("seed",))))
    for out in ("out1", "out2", "out1"):
        (tmp_path / out / "metrics.json").unlink(missing_ok=True)  # out1 again: not a finished run to skip
        cfg = OmegaConf.create({"experiment_name": "unit", "pipeline": "unit", "stage": "all", "seed": 0, "logger": {},
                                "paths": {"cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / out)}})
        run_pipeline(cfg, pipeline)
    (folder,) = cache.stage_folders(tmp_path / "cache")  # b never opened its folder: none was made
    assert folder.stage == "a" and folder.keys == {"seed": 0}
    assert sorted(run["out_dir"] for run in folder.runs) == [str(tmp_path / "out1"), str(tmp_path / "out2")]
    assert all(run["pid"] == os.getpid() and run["host"] == socket.gethostname() for run in folder.runs)
    assert [run["out_dir"] for run in folder.running()] == [run["out_dir"] for run in folder.runs]
    assert Path(folder.runs[-1]["out_dir"]).name == "out1"  # the newest use: out1's second run, its record rewritten
