"""Where a short `train` spends the seconds that are not epochs: one `train_model` call, timed
phase by phase (wall and CPU seconds, in order) with timers hooked around its steps.

    python bench/train_phases.py DATA_DIR MODEL_DIR [--epochs 3] [--batch-size N]

Prints one line per phase: interpreter start, imports, TensorFlow, data and model, the first
training step (graph tracing), each epoch, the best-weights restore, model.keras, the TFLite
export, the JSON files, the curves and the folder swap.
"""

from __future__ import annotations

import os
import time

T0_WALL, T0_CPU = time.perf_counter(), time.process_time()
MARKS: list[tuple[str, float, float]] = []


def since_process_start() -> float:
    """Seconds between this process's start (/proc) and now: the interpreter's own start-up."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


STARTUP = since_process_start()


def mark(name: str) -> None:
    MARKS.append((name, time.perf_counter(), time.process_time()))


import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from pipeline import train as train_module  # noqa: E402
from pipeline.core.settings import TrainSettings  # noqa: E402
from pipeline.inference import model_folder  # noqa: E402
from pipeline.report import plots  # noqa: E402

mark("import pipeline (no TensorFlow)")


def hooked(module, name: str, before: str | None, after: str):
    """Replace module.name by a wrapper that marks `before` when called and `after` when done."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        if before:
            mark(before)
        result = original(*args, **kwargs)
        mark(after)
        return result

    setattr(module, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=TrainSettings().batch_size)
    a = p.parse_args()

    from pipeline.core.native_stderr import import_keras

    keras = import_keras()
    mark("import TensorFlow and Keras")

    class Steps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if not hasattr(self, "seen"):
                self.seen = mark("first training step (tf.function tracing)")

        def on_epoch_end(self, epoch, logs=None):
            mark(f"epoch {epoch + 1} (with its validation)")

    fit_model = train_module.fit_model

    def fit_with_marks(model, *args):
        mark("load arrays, build and compile the model")
        fit = model.fit
        model.fit = lambda *f, **k: fit(*f, **{**k, "callbacks": [*k["callbacks"], Steps()]})
        result = fit_model(model, *args)
        mark("best-weights restore, history.csv read")
        return result

    train_module.fit_model = fit_with_marks
    hooked(model_folder, "export_tflite", "model.keras save", "model.tflite export (LiteRT)")
    # the curves are drawn by a child process during the save and the export: what is left is the wait
    hooked(
        plots.TrainingCurvesBeside,
        "wait",
        "classes/preprocess/settings.json",
        "training_curves.png (what is left of the child's drawing)",
    )
    settings = TrainSettings(epochs=a.epochs, batch_size=a.batch_size, patience=a.epochs)
    train_module.train_model(a.data, a.out, settings)
    mark("swap the folder in")

    print(f"{'interpreter start-up':44s} wall {STARTUP:6.2f} s")
    wall, cpu = T0_WALL, T0_CPU
    for name, w, c in MARKS:
        print(f"{name:44s} wall {w - wall:6.2f} s  cpu {c - cpu:6.2f} s")
        wall, cpu = w, c
    print(f"{'total':44s} wall {wall - T0_WALL + STARTUP:6.2f} s  cpu {cpu - T0_CPU:6.2f} s")


if __name__ == "__main__":
    main()
