"""The command line: each command gathers options and calls one stage function.

The only package that imports Typer. `base` holds the app and what every command shares;
each other module holds a group of commands, registered on the app when imported here.
Each stage module is imported inside its command, so `pipeline --help` stays instant.
Every error a user can cause, a bad option included, ends with one line on stderr and
exit code 1 (130 for Ctrl-C), never a traceback.
"""

# Each module registers its commands; `pipeline --help` lists them in this order, the run's.
from pipeline.cli import folders, models, answers  # noqa: F401, I001
from pipeline.cli.base import app, main

__all__ = ["app", "main"]
