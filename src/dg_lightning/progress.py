"""Progress bars with a total and an ETA for the long loops: Rich bars for loops (track, bar) and, for the Trainer,
Lightning's Rich progress bar counting optimiser steps of max_steps when training is step-based (StepProgressBar).

The bars are drawn on an interactive terminal (or in a notebook) only: in a log file or a pipe Rich cannot redraw
them, and a finished transient bar would leave only a blank line.
"""

from lightning.pytorch.callbacks import RichProgressBar
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


class StepProgressBar(RichProgressBar):
    """Lightning's Rich progress bar (same arguments); when training is step-based (trainer.max_steps > 0) one bar
    over the whole fit, "train steps (epoch e)" with optimiser steps done / max_steps and the ETA, where Lightning's
    restarts every epoch under "Epoch e/-2" (max_epochs -1 has no last epoch). Drawn on an interactive terminal only."""

    def setup(self, trainer, pl_module, stage):
        """Lightning's setup (rank 0 only draws); no bar off an interactive terminal."""
        super().setup(trainer, pl_module, stage)
        if not interactive():
            self.disable()

    @staticmethod
    def step_based(trainer):
        """Whether the fit ends at trainer.max_steps optimiser steps."""
        return trainer.max_steps is not None and trainer.max_steps > 0

    @property
    def total_train_batches(self):
        """max_steps for step-based training (the bar's total), else Lightning's batches per epoch."""
        return self.trainer.max_steps if self.step_based(self.trainer) else super().total_train_batches

    def _get_train_description(self, current_epoch):
        """"train steps (epoch e)" for step-based training, else Lightning's "Epoch e/last"."""
        if self.step_based(self.trainer):
            return f"train steps (epoch {current_epoch})"
        return super()._get_train_description(current_epoch)

    def on_train_epoch_start(self, trainer, pl_module):
        """Step-based: the one bar is made on the first epoch (at global_step, for a resumed fit) and renamed on the
        others; otherwise Lightning's bar per epoch."""
        if not self.step_based(trainer) or self.is_disabled or self.progress is None:
            return super().on_train_epoch_start(trainer, pl_module)
        if self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step,
                             description=self._get_train_description(trainer.current_epoch))
        self.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Step-based: the bar stands at global_step (optimiser steps, as max_steps counts); otherwise Lightning's."""
        if not self.step_based(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
