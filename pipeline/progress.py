"""Progress of long work, reported by the steps and shown by whoever runs them.

Why a process-wide reporter instead of a callback argument: the same steps run as plain calls,
as Prefect tasks in threads and as Dask tasks in other processes. A callback would have to
travel through Prefect's task parameters (and be pickled for Dask); here a step just calls
`progress(stage, done, total)`, and it is shown where a display was installed (the CLI on a
terminal) and costs nothing elsewhere.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Reporter = Callable[[str, int, int], None]

_lock = threading.Lock()
_reporter: Reporter | None = None


def progress(stage: str, done: int, total: int) -> None:
    """Tell the installed display that `done` of `total` units of `stage` are finished."""
    r = _reporter
    if r is not None:
        r(stage, done, total)


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Install `reporter` for the duration of a run (None: report nowhere)."""
    global _reporter
    with _lock:
        previous, _reporter = _reporter, reporter
    try:
        yield
    finally:
        with _lock:
            _reporter = previous


# Stage names as the display labels them, in run order (a stage not listed is shown as named).
STAGE_LABELS = {
    "ingest": "ingest files",
    "process": "mine cases",
    "embed": "embed cases",
    "index": "update index",
    "commit": "commit",
    "export": "export clusters",
    "library": "case library",
}


@contextmanager
def rich_display(console) -> Iterator[Reporter]:
    """One labelled bar per stage on `console` (a rich Console), as a reporter."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    tasks: dict[str, TaskID] = {}
    lock = threading.Lock()

    def update(stage: str, done: int, total: int) -> None:
        with lock:
            if stage not in tasks:
                tasks[stage] = bar.add_task(STAGE_LABELS.get(stage, stage), total=max(total, 1))
            bar.update(tasks[stage], completed=done if total else 1, total=max(total, 1))

    with bar:
        yield update


@contextmanager
def own_display_unless_reporting(show: bool) -> Iterator[None]:
    """A bar on stderr for long work outside a run (e.g. `casemine eval`), when `show` and no
    display is installed; inside a run the run's display shows it."""
    if not show or _reporter is not None:
        yield
        return
    from rich.console import Console

    with rich_display(Console(stderr=True)) as update, reporting(update):
        yield
