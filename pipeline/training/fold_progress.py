"""A fold's progress, wherever it trains: the Keras callback that sends it as messages
(`fold_reporter`) and the terminal board that shows every fold's (`FoldBoard`), for
`training.out_of_fold`."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.progress import TextColumn

from pipeline.core import progress
from pipeline.core.native_stderr import import_keras

BATCH_REPORT_SECONDS = 0.25  # a worker's progress messages, at most this often per fold


def fold_reporter(send: Callable, fold: int, epochs: int):
    """A Keras callback that sends a fold's progress as messages FoldBoard shows."""
    keras = import_keras()
    from pipeline.training.callbacks import epoch_summary, short_metrics

    class FoldReporter(keras.callbacks.Callback):
        sent = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch, self.started = epoch, time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            if now - self.sent >= BATCH_REPORT_SECONDS:
                self.sent = now
                done = self.epoch * self.params["steps"] + batch + 1
                send(("batches", fold, done, short_metrics(logs or {})))

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            send(("batches", fold, (epoch + 1) * self.params["steps"], short_metrics(logs)))
            send(("epoch", fold, epoch_summary(epoch, epochs, logs, time.perf_counter() - self.started)))

    return FoldReporter()


class FoldBoard:
    """The folds' progress on the terminal: a line when a fold starts and at each of its
    epochs' ends; on a terminal, a bar per fold while it trains as well."""

    def __init__(self, folds: int):
        self.folds, self.tasks = folds, {}
        self.bars = progress.bar(TextColumn("{task.fields[metrics]}"), transient=True) if progress.enabled() else None

    def __enter__(self):
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc):
        if self.bars is not None:
            self.bars.stop()

    def handle(self, message: tuple) -> None:
        kind, fold, *rest = message
        name = f"fold {fold + 1}/{self.folds}"
        if kind == "begin":
            self._say(f"{name}: {rest[0]}")
            if self.bars is not None:
                self.tasks[fold] = self.bars.add_task(name, total=rest[1], metrics="")
        elif kind == "batches" and fold in self.tasks:
            self.bars.update(self.tasks[fold], completed=rest[0], metrics=rest[1])
        elif kind == "epoch":
            self._say(f"{name}  {rest[0]}")
        elif kind == "end" and fold in self.tasks:
            self.bars.remove_task(self.tasks.pop(fold))

    def _say(self, line: str) -> None:
        if self.bars is not None:
            self.bars.console.print(line, markup=False)
        else:
            progress.say(line)
