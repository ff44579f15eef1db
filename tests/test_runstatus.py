"""The run folder's status marker (runstatus, written by the runner): run.json is running while the stages run, done
after them, failed with the error when a stage raises or the process gets SIGTERM, and a running marker whose process
is gone reads as failed."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import HANG_GUARD_S
from omegaconf import OmegaConf
from test_recipe import plain_cfg

from dg_lightning.pipelines.recipe import Pipeline, Stage, run_pipeline
from dg_lightning.runstatus import read_status


def test_a_run_is_marked_running_while_its_stages_run_then_done(tmp_path):
    seen = []
    pipeline = Pipeline("unit", (Stage("a", lambda run: seen.append(read_status(run.out_dir)), keys=("seed",)),))
    run_pipeline(plain_cfg(tmp_path), pipeline)
    (during,) = seen
    assert during["status"] == "running" and during["pid"] == os.getpid() and during["host"] == socket.gethostname()
    after = json.loads((tmp_path / "out" / "run.json").read_text())
    assert after["status"] == "done" and after["started"] == during["started"] and "ended" in after
    assert "error" not in after


def test_a_stage_that_raises_marks_the_run_failed_with_its_error(tmp_path):
    def fail(run):
        raise ValueError("the classifier file is broken")

    with pytest.raises(ValueError):
        run_pipeline(plain_cfg(tmp_path), Pipeline("unit", (Stage("a", fail),)))
    status = read_status(tmp_path / "out")
    assert status["status"] == "failed" and status["error"] == "ValueError: the classifier file is broken"
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_sigterm_unwinds_the_stages_and_marks_the_run_failed(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from omegaconf import OmegaConf
        from dg_lightning.pipelines.recipe import Pipeline, Stage, run_pipeline

        def wait(run):
            Path({str(tmp_path / "started")!r}).write_text("")
            while True:
                time.sleep(0.01)

        cfg = OmegaConf.create({OmegaConf.to_container(plain_cfg(tmp_path))!r})
        run_pipeline(cfg, Pipeline("unit", (Stage("wait", wait),)))
    """)
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        while not (tmp_path / "started").exists() and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=HANG_GUARD_S) == 128 + signal.SIGTERM
    finally:
        process.kill()
    status = read_status(tmp_path / "out")
    assert status["status"] == "failed" and status["error"] == "Terminated: terminated by SIGTERM"
    assert status["pid"] == process.pid


def test_a_running_marker_whose_process_is_gone_reads_as_failed(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid no longer runs
    for pid, expected in ((os.getpid(), "running"), (gone.pid, "failed")):
        (tmp_path / "run.json").write_text(json.dumps({"status": "running", "pid": pid, "host": socket.gethostname()}))
        assert read_status(tmp_path)["status"] == expected
    assert read_status(tmp_path)["error"] == f"process {gone.pid} on {socket.gethostname()} ended without finishing (killed?)"
    (tmp_path / "run.json").write_text(json.dumps({"status": "running", "pid": gone.pid, "host": "another-node"}))
    assert read_status(tmp_path)["status"] == "running"  # another host's pid cannot be checked from here
