"""train: prepared arrays -> the CIFAR-style CNN, early-stopped on the validation split.

Reads X_train/y_train, X_val/y_val and classes.json from the data folder (the test split
is never touched here). Writes, atomically, into the model folder: model.keras (best
weights by validation loss), model.tflite (the same model for the light interpreter),
classes.json, preprocess.json (all predict needs to treat a new file as training did),
history.csv and settings.json (this run's settings and prepare's, the precision used, and
whether the arrays were trained from memory or streamed from disk).

Speed: arrays that fit in memory are fed as uint8 through tf.data (shuffled row indices,
a gather per batch, prefetch), scaled inside the model, so there is no float copy of the
dataset; larger arrays stream from their memory maps a batch at a time. One endless
iterator serves the whole run (see `batches`).
On CPUs with native bfloat16 (AVX512-BF16 or AMX) the layers compute in mixed bfloat16
(softmax in float32); the saved and exported models are float32 either way.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline import paths, plots, progress
from pipeline.artifacts import atomic_dir, check_out_dir, read_json, write_json
from pipeline.dataset import load_classes, load_split
from pipeline.errors import PipelineError, TrainingInterrupted
from pipeline.images import RESIZE_METHOD
from pipeline.native import import_keras
from pipeline.settings import TrainSettings

PREPARE_HINT = "run `pipeline prepare IMAGES_DIR` first"
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # CPU flags for native bfloat16 matrix arithmetic


def train_model(data_dir: Path, out_dir: Path, settings: TrainSettings) -> dict:
    """Train, keep the best weights, write the model folder; returns a summary."""
    settings.check()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    check_out_dir(out_dir, paths.TRAIN_SETTINGS_FILE, {"data folder": data_dir})
    classes = load_classes(data_dir, PREPARE_HINT)
    X_train, y_train = load_split(data_dir, "train", len(classes))
    X_val, y_val = load_split(data_dir, "val", len(classes))
    if len(X_train) == 0:
        raise PipelineError(f"{data_dir} has no training images: prepare again with more images")
    if X_val.shape[1:] != X_train.shape[1:]:
        raise PipelineError(
            f"{data_dir}: train and val images differ in shape ({X_train.shape[1:]} vs {X_val.shape[1:]})"
        )
    prepare_report = read_json(data_dir / paths.PREPARE_REPORT_FILE, PREPARE_HINT)

    # TensorFlow takes seconds to load: only once the inputs are known to be usable.
    progress.say("loading TensorFlow...")
    keras = import_keras()
    from pipeline.model import compile_model
    from pipeline.training_progress import epoch_progress

    keras.utils.set_random_seed(settings.seed)
    precision = resolve_precision(settings.precision)
    model = compile_model(_build(X_train.shape[1:], len(classes), precision), settings.learning_rate)
    in_memory = X_train.nbytes + X_val.nbytes <= _in_memory_bytes(settings.in_memory_mb)
    has_val = len(X_val) > 0
    monitor = "val_loss" if has_val else "loss"
    early_stopping = keras.callbacks.EarlyStopping(
        monitor=monitor, patience=settings.patience, restore_best_weights=True
    )

    with ctrl_c_noted() as ctrl_c, atomic_dir(out_dir) as tmp:
        callbacks = [
            early_stopping,
            keras.callbacks.CSVLogger(str(tmp / paths.HISTORY_FILE)),
            epoch_progress(settings.epochs),
            keras.callbacks.LambdaCallback(
                on_train_begin=ctrl_c.check, on_train_batch_end=ctrl_c.check, on_test_batch_end=ctrl_c.check
            ),
        ]
        if settings.tensorboard:
            from pipeline.tensorboard_logs import EpochScalars

            callbacks.append(EpochScalars(tmp / paths.TENSORBOARD_DIR))
        train_batches, train_steps = batches(X_train, y_train, settings.batch_size, settings.seed, True, in_memory)
        val_batches, val_steps = (
            batches(X_val, y_val, settings.batch_size, settings.seed, False, in_memory) if has_val else (None, None)
        )
        started = time.perf_counter()
        interrupted = False
        try:
            model.fit(
                train_batches,
                validation_data=val_batches,
                epochs=settings.epochs,
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
        interrupted = interrupted or ctrl_c.pressed  # pressed as fit ended, and swallowed
        seconds = time.perf_counter() - started
        if early_stopping.best_weights is not None:
            model.set_weights(early_stopping.best_weights)
        history = _read_history(tmp / paths.HISTORY_FILE)
        summary = {
            "epochs_run": len(history),
            "best_epoch": early_stopping.best_epoch + 1 if history else 0,
            "monitor": monitor,
            "best": _finite(early_stopping.best),
            "seconds": round(seconds, 2),
            "train_images_per_s": round(len(history) * len(X_train) / seconds, 1) if seconds else None,
            "interrupted": interrupted,
            "precision": precision,
            "input": "memory (tf.data)" if in_memory else "memory-mapped batches",
        }
        if precision != "float32":  # save and export float32 weights: they run the same everywhere
            weights = model.get_weights()
            model = _build(X_train.shape[1:], len(classes), "float32")
            model.set_weights(weights)
        _write_model_folder(tmp, model, classes, data_dir, prepare_report, settings, summary)
        plots.save_training_curves(history, summary["best_epoch"], tmp / paths.CURVES_PNG)
    if interrupted:
        raise TrainingInterrupted(
            f"training interrupted after {summary['epochs_run']} epoch(s); the best model so far (epoch {summary['best_epoch']}) is saved in {out_dir}"
        )
    return summary


class _CtrlC:
    pressed = False

    def check(self, *args, **kwargs) -> None:
        if self.pressed:
            raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_noted():
    """Ctrl-C raises KeyboardInterrupt as usual and is also noted, so that `check` (a
    callback at every batch) raises it again if TensorFlow swallowed it: one that landed
    while the first graph was built was, now and then, lost, and training ran on to exit 0.
    """
    ctrl_c = _CtrlC()

    def on_sigint(signum, frame):
        ctrl_c.pressed = True
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: signals are not ours to handle
        previous = None
    try:
        yield ctrl_c
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _write_model_folder(tmp: Path, model, classes, data_dir, prepare_report, settings, summary) -> None:
    model.save(tmp / paths.MODEL_FILE)
    export_tflite(model, tmp / paths.TFLITE_FILE)
    shutil.copyfile(Path(data_dir) / paths.CLASSES_FILE, tmp / paths.CLASSES_FILE)
    size, _, channels = model.input_shape[1:]
    prep = prepare_report.get("settings", {})
    write_json(
        tmp / paths.PREPROCESS_FILE,
        {
            "size": int(size),
            "color": "grayscale" if channels == 1 else "rgb",
            "channels": int(channels),
            "resize": RESIZE_METHOD,
            "input": "uint8 pixels 0-255; scaling to 0-1 is inside the model",
        },
    )
    write_json(
        tmp / paths.TRAIN_SETTINGS_FILE,
        {
            "train": asdict(settings),
            "summary": summary,
            "data_dir": str(Path(data_dir).resolve()),
            "prepare": prep,
            "classes": classes,
        },
    )


def export_tflite(model, path: Path) -> None:
    """The same network for the LiteRT interpreter, which predicts without importing TensorFlow."""
    model.export(str(path), format="litert", verbose=False)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_precision(precision: str) -> str:
    """auto -> bfloat16 on CPUs with native bf16 arithmetic (measured 1.5-2x faster here), else float32."""
    if precision == "auto":
        return "bfloat16" if cpu_flags() & BF16_FLAGS else "float32"
    return precision


def _build(input_shape, num_classes: int, precision: str):
    """The model under this precision's dtype policy; the global policy is restored at once."""
    from pipeline.model import build_model

    keras = import_keras()
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        return build_model(input_shape, num_classes)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _in_memory_bytes(limit_mb: int) -> int:
    if limit_mb >= 0:
        return limit_mb * 2**20
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            free_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return free_kb * 1024 // 2
    except (OSError, StopIteration, ValueError):
        return 2 * 2**30


def batches(X, y, batch_size: int, seed: int, shuffle: bool, in_memory: bool):
    """(dataset, steps per epoch): batches of uint8 pixels and integer labels, endlessly.

    The pipeline shuffles row indices (not images), reshuffled every epoch, and gathers each
    batch while the previous one trains: from one uint8 copy of the rows in memory, or
    from the memory map, where only the batch being read is in memory, so arrays larger
    than memory train too. It repeats, and fit counts epochs in steps: one iterator for
    the whole run, because making a new one every epoch stalled the epoch's first batch
    by up to 2.5 s here (measured on the bench arrays); Keras still remakes the validation
    iterator every epoch, hence no autotuner (below).
    """
    import tensorflow as tf

    rows = tf.data.Dataset.range(len(X))
    if shuffle:
        rows = rows.shuffle(len(X), seed=seed, reshuffle_each_iteration=True)
    if in_memory:
        images, labels = tf.constant(np.asarray(X)), tf.constant(np.asarray(y))
        gather = lambda i: (tf.gather(images, i), tf.gather(labels, i))  # noqa: E731
    else:

        def read(i):
            i = np.sort(i)  # ascending reads from the memory map
            return np.asarray(X[i]), np.asarray(y[i], dtype=np.int64)

        def gather(i):
            images, labels = tf.numpy_function(read, [i], (tf.uint8, tf.int64), stateful=False)
            images.set_shape((None, *X.shape[1:]))
            labels.set_shape((None,))
            return images, labels

    dataset = rows.batch(batch_size).map(gather, num_parallel_calls=1).repeat().prefetch(2)
    options = tf.data.Options()
    # tf.data's autotuner, when the validation iterator was remade each epoch, sometimes
    # stalled the run for ~2 s with the CPU idle; a fixed prefetch of 2 batches is enough.
    options.autotune.enabled = False
    return dataset.with_options(options), math.ceil(len(X) / batch_size)


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        return []
    header = lines[0].split(",")
    return [dict(zip(header, map(float, line.split(",")))) for line in lines[1:]]
