"""Progress bars on stderr that step aside when stderr is not a terminal or when asked to be quiet.

PIPELINE_PROGRESS=always draws them even when stderr is not a terminal (for tests and for
terminals that do not say they are one); PIPELINE_PROGRESS=never never draws them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True, highlight=False, soft_wrap=True)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def enabled() -> bool:
    """Whether to draw bars: never with --quiet, else as PIPELINE_PROGRESS says (default: stderr is a tty)."""
    mode = _mode()
    if _quiet or mode == "never":
        return False
    return mode == "always" or sys.stderr.isatty()


def _mode() -> str:
    return os.environ.get("PIPELINE_PROGRESS", "auto").strip().lower()


def say(message: str) -> None:
    """A line for the person at the terminal (stderr, so stdout stays clean for --json)."""
    if not _quiet:
        console.print(message, soft_wrap=True, markup=False)


def bar(*extra_columns, transient: bool = False) -> Progress:
    """A rich Progress on stderr: description, bar, n/total, elapsed, time left, then `extra_columns`."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        *extra_columns,
        console=console
        if console.is_terminal or _mode() != "always"
        else Console(stderr=True, highlight=False, force_terminal=True),
        transient=transient,
    )


def track(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    if not enabled():
        yield from items
        return
    with bar() as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
