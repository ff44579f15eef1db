"""The published figures of the default runs (docs/published.json): each names its command, commit, date and machine
and stands in the doc it names, and the current code gives them within their stated spread: `python run.py` in
test_run (a slow test, so in CI) and `python run.py experiment=digits_edm_g++` here with `--published`."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = json.loads((ROOT / "docs" / "published.json").read_text())
FIELDS = {"command", "commit", "date", "machine", "doc", "spread_from", "metrics"}


def assert_published(run, metrics):
    """Each published metric of `run` within its spread of the value a run gave (its metrics.json)."""
    for name, figure in PUBLISHED[run]["metrics"].items():
        assert abs(metrics[name] - figure["value"]) <= figure["spread"], (
            f"{name}: this run gives {metrics[name]:.4f}, docs/published.json says {figure['value']} ± "
            f"{figure['spread']}: measure the default run again and update docs/published.json and {PUBLISHED[run]['doc']}")


@pytest.mark.parametrize("run", PUBLISHED)
def test_a_published_run_names_its_command_commit_and_machine_and_its_doc_shows_its_figures(run):
    entry = PUBLISHED[run]
    assert set(entry) == FIELDS and entry["command"].startswith("python run.py") and entry["spread_from"]
    assert re.fullmatch(r"[0-9a-f]{7,40}", entry["commit"]) and re.fullmatch(r"\d{4}-\d\d-\d\d", entry["date"])
    doc = (ROOT / entry["doc"]).read_text()
    section = doc[doc.index(f"`{entry['command']}` at commit {entry['commit']}"):]
    for name, figure in entry["metrics"].items():
        assert figure["spread"] >= 0, name
        assert f"| `{name}` | {figure['value']:.3f} ± {figure['spread']:g} |" in section, \
            f"{entry['doc']} does not show {name} = {figure['value']:.3f} ± {figure['spread']:g} of docs/published.json"


@pytest.mark.slow
def test_the_default_digits_run_gives_the_published_figures(request, tmp_path):
    if not request.config.getoption("--published"):
        pytest.skip("the default digits run takes about 2 minutes on 2 idle cores: run with --published")
    from test_run import run_py
    run_py(tmp_path, "experiment=digits_edm_g++", one_thread=False)  # as a user runs it: torch's default threads
    (run_dir,) = (tmp_path / "logs" / "digits_edm_g++" / "runs").iterdir()
    assert_published("digits_edm_g++", json.loads((run_dir / "metrics.json").read_text()))
