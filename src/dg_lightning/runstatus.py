"""The status marker of a run folder: run.json, written by the runner (rank 0) at the start of a run and updated when
it ends, so a killed or failed run is told from one still running and from one that finished.

    {"status": "running" | "failed" | "done", "pid": 1234, "host": "node-1", "started": "2026-12-03T08:00:00+00:00",
     "ended": "..." (failed, done), "error": "ValueError: ..." (failed)}

A run that raises, or gets SIGTERM (turned into a Terminated exception that unwinds the stages), is marked failed; a run
killed without a chance to write (SIGKILL, a lost node) stays "running" with a pid that no longer runs: read_status
reports it as failed when that pid is on this host.
"""

import contextlib
import datetime
import json
import os
import signal
import socket
import threading
from pathlib import Path

from dg_lightning.distributed import rank_and_world_size
from dg_lightning.files import write_atomic

RUN_STATUS = "run.json"
LAUNCHER_RANKS = ("RANK", "LOCAL_RANK", "SLURM_PROCID")  # set in every rank's process before its process group exists


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread: the stages unwind (temp files removed, the run marked failed) and the
    process exits with 128 + the signal's number."""

    def __init__(self, signum):
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name

    def __str__(self):
        return f"terminated by {self.signal_name}"


def _now():
    """The current UTC time, ISO 8601."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _is_rank_zero():
    """Whether this process is the run's first rank (also before its process group is set up)."""
    return rank_and_world_size()[0] == 0 and all(os.environ.get(name, "0") == "0" for name in LAUNCHER_RANKS)


def write_status(out_dir, status, **fields):
    """Write run.json in out_dir (atomically, rank 0 only): the status, this process's pid and host, and `fields`."""
    if _is_rank_zero():
        record = {"status": status, "pid": os.getpid(), "host": socket.gethostname(), **fields}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(out_dir) / RUN_STATUS, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))


def _raise_terminated(signum, frame):
    """The SIGTERM handler of a run: raise Terminated where the main thread is."""
    raise Terminated(signum)


@contextlib.contextmanager
def run_status(out_dir):
    """Mark out_dir's run running, then done when the block ends, or failed (with the error) when it raises or the
    process gets SIGTERM (in the main thread; the previous handler comes back after the block)."""
    started = _now()
    write_status(out_dir, "running", started=started)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        yield
    except BaseException as exc:
        write_status(out_dir, "failed", started=started, ended=_now(), error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    write_status(out_dir, "done", started=started, ended=_now())


def _alive(pid):
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, under another user
        return True
    return True


def read_status(folder):
    """run.json of a run folder (None without one); a "running" run whose pid no longer runs on this host is reported
    as failed, its error saying so."""
    path = Path(folder) / RUN_STATUS
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record["status"] == "running" and record.get("host") == socket.gethostname() and not _alive(record["pid"]):
        record = {**record, "status": "failed",
                  "error": f"process {record['pid']} on {record['host']} ended without finishing (killed?)"}
    return record
