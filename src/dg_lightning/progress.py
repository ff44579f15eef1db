"""Progress bars with a total and an ETA for the long loops: Rich bars for loops (track, bar); the Trainer's is
callbacks.StepProgressBar. No framework is imported here, so the samplers and metrics can use them.

The bars are drawn on an interactive terminal (or in a notebook) only: in a log file or a pipe Rich cannot redraw
them, and a finished transient bar would leave only a blank line.
"""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def interactive():
    """Whether the console is a terminal or a notebook that Rich can redraw a bar in."""
    console = Console()
    return console.is_interactive or console.is_jupyter


def bar(enabled=True):
    """A transient Rich Progress of description, bar, done/total, elapsed time and ETA (add_task(description,
    total=...) then advance), drawn only when enabled on an interactive terminal."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # new columns per bar: a column caches its renders by task id
    return Progress(*columns, transient=True, disable=not (enabled and interactive()))


def track(iterable, description, enabled=True, total=None):
    """Iterate with a bar of `total` items (default len(iterable)) when enabled on an interactive terminal, plainly
    otherwise."""
    progress = bar(enabled)
    if progress.disable:
        return iterable
    return _tracked(progress, iterable, description, len(iterable) if total is None else total)


def _tracked(progress, iterable, description, total):
    """Yield the items of iterable, advancing one task of `progress` per item."""
    with progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)
