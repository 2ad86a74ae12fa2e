"""Fitting the compiled model: Keras fit on one replica, the replicated loop on more.

`fit_model` trains with early stopping on the validation loss (the training loss without
a validation split), TerminateOnNaN, history.csv, the epoch lines and TensorBoard, and
leaves the best epoch's weights in the model. `ctrl_c_noted` turns Ctrl-C into a stop at
the next batch boundary.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core import paths
from pipeline.core.native_stderr import import_keras
from pipeline.core.settings import TrainSettings
from pipeline.data.data_folder import TrainingData
from pipeline.inference.model_folder import read_history
from pipeline.training.batches import (
    batches,
    class_weights,
    class_weights_from_epoch,
    in_memory_bytes,
    with_class_weights,
)


@dataclass
class FitResult:
    history: list[dict]  # one row per epoch, as history.csv
    best_epoch: int  # 1-based; 0 when no epoch finished
    monitor: str
    best: float | None  # the monitored value at best_epoch; None when it was never finite
    seconds: float
    interrupted: bool
    loop: dict = field(default_factory=dict)  # the custom loop's global batch and steps; empty under fit
    class_weights: dict[str, float] | None = None  # by class name, as fit weighted the loss (--class-weight)
    resumed_after: int = 0  # epochs a checkpoint had done before this process (train --resume)


def fit_model(
    model,
    data: TrainingData,
    settings: TrainSettings,
    in_memory: bool,
    tmp: Path,
    ctrl_c,
    plan=None,
    checkpoints=None,
    epoch_progress=None,
) -> FitResult:
    """Keras fit with early stopping on the validation loss (the training loss without a
    validation split); the best epoch's weights are back in `model` when it returns. With
    more than one replica (several GPUs, several workers) the replicated loop's custom step
    runs instead of fit, driving the same callbacks. `checkpoints` (training.checkpoints)
    writes one at every epoch end and resumes from the one it found. `epoch_progress`, a
    callback, shows the progress in place of the terminal's bars or lines (the audit's folds)."""
    has_val = len(data.X_val) > 0
    monitor = "val_loss" if has_val else "loss"
    weights = class_weights(data.y_train, len(data.classes)) if settings.class_weight == "balanced" else None
    by_name = dict(zip(data.classes, map(float, weights))) if weights is not None else None
    weighted_from = class_weights_from_epoch(settings.epochs)
    early_stopping, callbacks = _callbacks(
        settings, monitor, tmp, weighted_from if weights is not None else 0, checkpoints is not None, epoch_progress
    )
    if checkpoints is not None:  # last: it saves what early stopping and the CSV logger have just recorded
        callbacks.append(checkpoints.callback(early_stopping, tmp / paths.HISTORY_FILE))
    if plan is not None and plan.custom_loop:
        from pipeline.training.replicated import fit_replicated

        started = time.perf_counter()
        memory = in_memory_bytes(settings.in_memory_mb)
        interrupted, loop = fit_replicated(
            model, data, settings, plan, callbacks, ctrl_c, memory, has_val, weights, weighted_from, checkpoints,
            lambda: checkpoints.restore(model, early_stopping, tmp / paths.HISTORY_FILE, plan) if checkpoints else None,
        )  # fmt: skip
        if interrupted and early_stopping.best_weights is None:  # no epoch finished: nothing to keep
            raise KeyboardInterrupt
        seconds = time.perf_counter() - started
    else:
        interrupted, seconds = _fit_one_replica(
            model, data, settings, in_memory, callbacks, ctrl_c, weights, weighted_from, early_stopping, checkpoints,
            tmp,
        )  # fmt: skip
        loop = None
    result = _fit_result(model, early_stopping, monitor, tmp, seconds, interrupted, loop, by_name)
    result.resumed_after = checkpoints.start_epoch if checkpoints is not None else 0
    return result


def _callbacks(
    settings: TrainSettings, monitor: str, tmp: Path, watch_from: int, resumable: bool = False, shown_by=None
):
    """(early stopping, every callback): the ones fit and the replicated loop both drive."""
    keras = import_keras()
    from pipeline.training.callbacks import EpochScalars, epoch_progress

    early_stopping = keras.callbacks.EarlyStopping(
        monitor=monitor,
        patience=settings.patience,
        restore_best_weights=True,
        # class weights: neither stopped nor the best kept before the weights weigh the loss,
        # or a run could end, or be restored to an epoch, that the weights never reached
        start_from_epoch=watch_from,
    )
    callbacks = [
        early_stopping,
        keras.callbacks.TerminateOnNaN(),  # a NaN loss never comes back: stop at once
        keras.callbacks.CSVLogger(str(tmp / paths.HISTORY_FILE), append=resumable),  # after the resumed rows
        shown_by or epoch_progress(settings.epochs),
    ]
    if settings.tensorboard:
        callbacks.append(EpochScalars(tmp / paths.TENSORBOARD_DIR))
    return early_stopping, callbacks


def _fit_one_replica(
    model, data, settings, in_memory, callbacks, ctrl_c, weights, weighted_from, early_stopping, checkpoints, tmp
):
    """Keras fit on the batches of `training.batches`; returns (interrupted, seconds fitting)."""
    keras = import_keras()
    callbacks = callbacks + [
        keras.callbacks.LambdaCallback(
            on_train_begin=ctrl_c.check, on_train_batch_end=ctrl_c.check, on_test_batch_end=ctrl_c.check
        )
    ]
    has_val = len(data.X_val) > 0
    start = checkpoints.start_epoch if checkpoints is not None else 0
    train_batches, train_steps = batches(
        data.X_train, data.y_train, settings.batch_size, settings.seed, True, in_memory, skip_epochs=start
    )
    val_batches, val_steps = (
        batches(data.X_val, data.y_val, settings.batch_size, settings.seed, False, in_memory)
        if has_val
        else (None, None)
    )
    if weights is not None:
        train_batches = with_class_weights(train_batches, weights, (weighted_from - start) * train_steps)
        if has_val:  # the best epoch by the loss the user asked for, every epoch weighed alike
            val_batches = with_class_weights(val_batches, weights, 0)
    started = time.perf_counter()
    _build_state_before_tracing(model, data.X_train, data.y_train)
    if checkpoints is not None:
        checkpoints.restore(model, early_stopping, tmp / paths.HISTORY_FILE)
        if checkpoints.resumed is not None and (checkpoints.resumed.stopped or start >= settings.epochs):
            return False, 0.0  # killed after its last epoch's checkpoint: nothing left to fit
    interrupted = False
    try:
        model.fit(
            train_batches,
            validation_data=val_batches,
            epochs=settings.epochs,
            initial_epoch=start,
            steps_per_epoch=train_steps,
            validation_steps=val_steps,
            shuffle=False,  # the batches shuffle themselves, seeded
            callbacks=callbacks,
            verbose=0,
        )
    except KeyboardInterrupt:
        interrupted = True
        if early_stopping.best_weights is None:  # no epoch finished: nothing to keep
            raise  # the temporary folder goes, the CLI says so and exits 130
    # ctrl_c.pressed: pressed as fit ended, and swallowed
    return interrupted or ctrl_c.pressed, time.perf_counter() - started


def _build_state_before_tracing(model, X, y) -> None:
    """Adam's moments and the accuracy metric's counters, made now on one image: made inside
    the first traced step, they had TensorFlow trace the whole training step twice (about a
    second of every run). fit resets the metrics at each epoch, so nothing of this is counted."""
    model.optimizer.build(model.trainable_variables)
    one = np.asarray(X[:1])
    model.compute_metrics(one, np.asarray(y[:1]), model(one, training=False), None)
    model.reset_metrics()


def _fit_result(
    model,
    early_stopping,
    monitor: str,
    tmp: Path,
    seconds: float,
    interrupted: bool,
    loop: dict | None,
    class_weights_by_name: dict[str, float] | None,
):
    if early_stopping.best_weights is not None:
        model.set_weights(early_stopping.best_weights)
    history = read_history(tmp / paths.HISTORY_FILE)
    best = _finite(early_stopping.best) if early_stopping.best_weights is not None else None
    return FitResult(
        history=history,
        best_epoch=early_stopping.best_epoch + 1 if history and best is not None else 0,
        monitor=monitor,
        best=best,
        seconds=seconds,
        interrupted=interrupted,
        loop=loop or {},
        class_weights=class_weights_by_name,
    )


class _CtrlC:
    pressed = False

    def check(self, *args, **kwargs) -> None:
        if self.pressed:
            raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_noted():
    """Ctrl-C is noted, and `check` (a callback at every batch) raises KeyboardInterrupt at
    the next batch boundary; a second Ctrl-C raises at once. Raised from inside a
    TensorFlow call (tracing the first graph, a step), the interrupt was now and then
    swallowed, and under load a process stopped in the middle of a native call crashed
    (SIGSEGV) on its way out; between batches nothing native is running.
    """
    ctrl_c = _CtrlC()

    def on_sigint(signum, frame):
        if ctrl_c.pressed:
            raise KeyboardInterrupt
        ctrl_c.pressed = True

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: signals are not ours to handle
        previous = None
    try:
        yield ctrl_c
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
