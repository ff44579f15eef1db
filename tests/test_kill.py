"""A real `python run.py stage=train` process SIGKILLed in the middle of its discriminator training, in every pipeline,
and run again in the same folder: it resumes from last.ckpt and ends with the weights (the head, and the head that
select=best keeps) and the logged metrics of an uninterrupted run."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD_S
from test_checkpoints import write_edm_pickle  # noqa: F401  (fixture: EDM-format pickles)

import killer
import test_adm_g_pipeline
import test_edm_pipeline
import test_imagenet_pipeline
from test_digits import REDUCED as DIGITS

TESTS = Path(__file__).resolve().parent
KILL = ["stage=train", "+callbacks.kill._target_=killer.KillOnce", "+callbacks.kill.stage=train", "+callbacks.kill.epoch=1"]
EDM = "cifar10_edm_g++"
# pipeline: (overrides, a function writing the released files into a folder and returning it, or None); each trains
# for 3 epochs of at least 2 batches, so the kill before batch 1 of epoch 1 falls inside an epoch
PIPELINES = {
    "toy2d": (["data.num_fake=400", "data.num_real=400", "data.num_held_out=40", "metrics.num_samples=300",
               "trainer.max_steps=-1", "trainer.max_epochs=3", "data.batch_size=128"], None),
    "digits": ([*DIGITS, "trainer.max_epochs=3", "discriminator.select=best"], None),
    "edm": ([f"experiment={EDM}", "+smoke=edm", "paths.released_dir=RELEASED", "trainer.max_epochs=3"], "edm"),
    "imagenet_dit": ([*test_imagenet_pipeline.PIPELINE.overrides("RELEASED")[1:], "trainer.max_epochs=3"],
                     test_imagenet_pipeline.write_released_files),
    "imagenet_adm": ([*test_adm_g_pipeline.PIPELINE.overrides("RELEASED")[1:], "trainer.max_epochs=3"],
                     test_adm_g_pipeline.write_released_files),
}
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["killer", "hydra", "dg_lightning.console", "dg_lightning.pipelines"])
PIPELINES["imagenet_dit"][0].insert(0, f"experiment={test_imagenet_pipeline.PIPELINE.experiment}")
PIPELINES["imagenet_adm"][0].insert(0, f"experiment={test_adm_g_pipeline.PIPELINE.experiment}")


def run_py(cwd, args):
    """Run `python run.py ARGS` in cwd, in a process forked from a server that imported the project once (the imports
    took 4 s of each run's 5 to 16 s); returns the CompletedProcess: its exit code (-signal when killed), stdout and
    stderr together in stderr."""
    log = cwd / "console.log"
    process = FORKSERVER.Process(target=killer.run_py, args=(cwd, [str(TESTS.parent / "run.py"), *args],
                                                             {**os.environ, "OMP_NUM_THREADS": "1"}, log))
    process.start()
    process.join(HANG_GUARD_S)
    if process.exitcode is None:
        process.kill()
        raise TimeoutError(f"run.py {' '.join(args)} ran past {HANG_GUARD_S} s")
    return subprocess.CompletedProcess(args, process.exitcode, stderr=log.read_text())


def outcome(cwd):
    """The last run's metrics.json under cwd and every weights file the train stage wrote outside its checkpoints/
    (discriminator.pt, and sampling/best_discriminator.pt with select=best), by path relative to the stage folder."""
    run_dir = max((cwd / "logs").glob("*/runs/*"))
    (train_dir,) = (cwd / "logs" / "cache").glob("*/train-*")
    weights = {str(p.relative_to(train_dir)): torch.load(p, weights_only=True) for p in train_dir.rglob("*.pt")}
    return json.loads((run_dir / "metrics.json").read_text()), weights


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, request, pipeline):
    overrides, released = PIPELINES[pipeline]
    if released == "edm":
        pickles = request.getfixturevalue("write_edm_pickle")
        released = lambda folder: test_edm_pipeline.write_released_files(folder, EDM, pickles)  # noqa: E731
    if released is not None:
        folder = released(tmp_path / "released")
        overrides = [o.replace("RELEASED", str(folder)) for o in overrides]
    args = [*overrides, *KILL, "logger=csv"]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "killed").touch()  # the uninterrupted run: its KillOnce finds the marker and spares it

    uninterrupted = run_py(tmp_path / "a", args)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    # The stages before train are the uninterrupted run's, from the cache (as the resumed run has them anyway).
    shutil.copytree(tmp_path / "a" / "logs" / "cache", tmp_path / "b" / "logs" / "cache",
                    ignore=shutil.ignore_patterns("train-*"))
    killed = run_py(tmp_path / "b", args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (train_dir,) = (tmp_path / "b" / "logs" / "cache").glob("*/train-*")
    assert (train_dir / "checkpoints" / "last.ckpt").exists() and not (train_dir / "discriminator.pt").exists()
    resumed = run_py(tmp_path / "b", args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    (metrics, weights), (metrics_resumed, weights_resumed) = outcome(tmp_path / "a"), outcome(tmp_path / "b")
    assert "discriminator.pt" in weights and weights.keys() == weights_resumed.keys()
    for name, state in weights.items():
        assert state.keys() == weights_resumed[name].keys()
        assert all(torch.equal(value, weights_resumed[name][key]) for key, value in state.items()), name
    assert metrics_resumed == metrics
