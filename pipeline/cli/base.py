"""What every command shares: the Typer app, one-line errors, Ctrl-C, the common options.

The commands themselves are in the modules beside this one, a module per group.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from pipeline.core import progress
from pipeline.core.errors import PipelineError, full_disk
from pipeline.core.settings import (
    BACKBONES,
    CLASS_WEIGHTS,
    COLOR_MODES,
    ENGINES,
    EXPORT_FORMATS,
    PRECISIONS,
    SCHEDULES,
    AuditSettings,
    ExportSettings,
    InspectSettings,
    PredictSettings,
    PrepareSettings,
    ServeSettings,
    TrainSettings,
)

try:  # typer below 0.29 carries its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError


class OneLineErrors(TyperGroup):
    """A bad option or value (a usage error to click, exit 2 in a box) is one line and exit 1,
    like every other error a user can cause."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as e:  # `pipeline` or `pipeline predict` alone: the help
            e.show()
            code = 0 if e.ctx is not None and e.ctx.parent is None else 1
        except ClickException as e:
            progress.console.print(f"error: {e.format_message()}", markup=False)
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="Turn a folder of class-named image folders into a trained image classifier.\n\n"
    "Run in order: prepare IMAGES_DIR, train, evaluate, predict FILE... (or serve the model: serve; "
    "take it elsewhere: export --format)",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Option defaults come from the settings, the one place they are set.
PREPARE, TRAIN, PREDICT, INSPECT = PrepareSettings(), TrainSettings(), PredictSettings(), InspectSettings()
SERVE, EXPORT, AUDIT = ServeSettings(), ExportSettings(), AuditSettings()
Color = Enum("Color", {mode: mode for mode in COLOR_MODES}, type=str)
Precision = Enum("Precision", {p: p for p in PRECISIONS}, type=str)
Backbone = Enum("Backbone", {b: b for b in BACKBONES}, type=str)
Engine = Enum("Engine", {e: e for e in ENGINES}, type=str)
Schedule = Enum("Schedule", {s: s for s in SCHEDULES}, type=str)
ClassWeight = Enum("ClassWeight", {w: w for w in CLASS_WEIGHTS}, type=str)
ExportFormat = Enum("ExportFormat", {f: f for f in EXPORT_FORMATS}, type=str)
ENGINE_HELP = "auto: LiteRT when installed, else Keras; or an export by its format's name (pipeline export)."


_signalled = False


def _interrupted_exit() -> typer.Exit:
    progress.console.print("interrupted: nothing was written, earlier artifacts are untouched", markup=False)
    return typer.Exit(code=130)


def _interrupt(signum, frame):
    global _signalled
    _signalled = True
    raise KeyboardInterrupt


def user_errors(command):
    """Errors a user can cause end with one line on stderr and a non-zero exit, no traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except PipelineError as e:
            progress.console.print(f"error: {e}", markup=False)
            raise typer.Exit(code=getattr(e, "exit_code", 1)) from None
        except KeyboardInterrupt:
            raise _interrupted_exit() from None
        except Exception as e:
            # A signal that lands inside C code (numpy reading a file, say) can come out as
            # that code's own error instead of KeyboardInterrupt: still an interruption.
            if _signalled:
                raise _interrupted_exit() from None
            full = full_disk(e)
            if full is None:
                raise
            progress.console.print(f"error: {full}", markup=False)
            raise typer.Exit(code=1) from None

    return run


def one_blas_thread() -> None:
    """For commands that run one decoding process per core: numpy's OpenBLAS, told before
    it loads, starts no threads of its own, which otherwise spun on the cores the decoding
    processes needed (5% of prepare's CPU time, measured with perf)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def settings_from(kind, options: dict):
    """A settings dataclass from a command's options, taken by field name (enums as their values)."""
    names = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v.value if isinstance(v, Enum) else v for k, v in options.items() if k in names})


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes on stderr.")]
DataDir = Annotated[Path, typer.Option("--data", help="Prepared data folder (from prepare).")]
ModelDir = Annotated[Path, typer.Option("--model", help="Model folder (from train).")]
THRESHOLD_OPTION = typer.Option(help="Below this calibrated confidence (0-1) the label is 'unsure'.")
TARGET_ACCURACY_OPTION = typer.Option(
    help="Answer 'unsure' below the lowest confidence that reached this accuracy on the validation split "
    "(train records 0.95 and 0.99).",
    show_default=False,
)
NOVELTY_OPTION = typer.Option(
    help="Above this novelty the label is 'unknown', a picture unlike the training images "
    "(default: the model's own, set on validation; 0: off)."
)
TTA_OPTION = typer.Option("--tta", help="Average over the image and its mirror image (where prepare allowed flips).")


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):  # a kill runs the same clean-up as Ctrl-C
        signal.signal(signum, _interrupt)
    app()
