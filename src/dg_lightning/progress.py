"""Rich progress bars for long loops."""

from rich.progress import track as rich_track


def track(iterable, description, enabled=True, total=None):
    """Iterate with a Rich progress bar when enabled, plainly otherwise."""
    if not enabled:
        return iterable
    return rich_track(iterable, description=description, total=total, transient=True)
