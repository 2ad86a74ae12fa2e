"""Progress bars on stderr that step aside when stderr is not a terminal or when asked to be quiet.

PIPELINE_PROGRESS=always draws them even when stderr is not a terminal (for tests and for
terminals that do not say they are one); PIPELINE_PROGRESS=never never draws them.

Every console of the package is a `PlainConsole`: what it prints is plain text, whoever
wrote it (file and class names are the user's, or a stranger's): no rich markup or emoji
codes are read, and control characters are shown escaped (`plain`), so a name cannot clear
the screen, retitle the terminal or reorder its line (bidirectional overrides).
"""

from __future__ import annotations

import os
import re
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

# C0 and C1 controls but tab and newline, bidirectional overrides, and lone surrogates (the
# bytes of a file name that was not UTF-8, which no terminal encoding takes)
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def plain(text: str) -> str:
    """`text` with every control character written as an escape (\\x1b, \\u202e; a byte
    of a name that was not UTF-8 as \\xNN)."""
    return _UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the original byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class PlainConsole(Console):
    """A rich Console that renders every string, table cells included, as plain text."""

    def __init__(self, **options):
        super().__init__(markup=False, emoji=False, highlight=False, **options)

    def render_str(self, text: str, **options):
        options.update(markup=False, emoji=False, highlight=False)
        return super().render_str(plain(text), **options)


console = PlainConsole(stderr=True, soft_wrap=True)
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
        else PlainConsole(stderr=True, force_terminal=True),
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
