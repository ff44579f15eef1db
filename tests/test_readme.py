"""Every `run.py` command the README and docs/*.md show composes with the real config: no documented key, group or
experiment has gone stale. Sweeps compose at their first value, `experiment=<name>` as the README's running example, and other
placeholders (`<folder>`) as a plain word."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE_EXPERIMENT = "cifar10_edm_g++"
HAS_SUBMITIT = importlib.util.find_spec("hydra_plugins") is not None and \
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None


def code_texts(markdown):
    """The text of every fenced code block line and every inline code span, line continuations joined."""
    markdown = markdown.replace("\\\n", " ")
    blocks = re.findall(r"```[a-z]*\n(.*?)```", markdown, flags=re.S)
    inline = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", markdown, flags=re.S))
    lines = [line.split("  #")[0] for block in blocks for line in block.splitlines()]
    return lines + [" ".join(span.split()) for span in inline]


def overrides_of(command):
    """The Hydra overrides after `run.py` in one command: placeholders and flags dropped, sweeps at their first value,
    the SLURM launcher's settings dropped where its plugin is not installed."""
    overrides = []
    for token in command.split("run.py", 1)[1].split():
        key, _, value = token.partition("=")
        if not value or token == "key=value" or "..." in token:
            continue
        value = EXAMPLE_EXPERIMENT if token == "experiment=<name>" else re.sub(r"<[^>]*>", "x", value)  # <folder>
        if not HAS_SUBMITIT and (key == "hydra/launcher" or key.startswith("hydra.launcher.")):
            continue
        overrides.append(f"{key}={value if value.startswith('[') else value.split(',')[0]}")
    return overrides


COMMANDS = sorted({" ".join(overrides_of(text)) for text in code_texts(README.read_text()) if "run.py " in text})
DOC_COMMANDS = sorted({" ".join(overrides_of(text)) for doc in DOCUMENTS for text in code_texts(doc.read_text())
                       if "run.py " in text})


def test_the_readme_documents_the_entry_point_commands():
    assert "" in COMMANDS  # `python run.py`, the default experiment
    assert any("experiment=imagenet_dit_g++" in command for command in COMMANDS)
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("command", DOC_COMMANDS)
def test_readme_command_composes(compose_cfg, command):
    """Composition refuses unknown keys, groups and experiments (ConfigCompositionException)."""
    compose_cfg(*command.split())
