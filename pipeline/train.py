"""train: prepared arrays -> the CIFAR-style CNN, early-stopped on the validation split.

Reads X_train/y_train, X_val/y_val, classes.json and report.json from the data folder (the
test split is never touched here). Writes, atomically, the model folder (see
model_folder.py): model.keras (best weights by validation loss), model.tflite,
classes.json, preprocess.json, history.csv, training_curves.png and settings.json (this
run's settings and prepare's, the precision used, and whether the arrays were trained
from memory or streamed from disk).

The steps, in `train_model`'s order: check the inputs before TensorFlow loads
(`load_training_data`); build the model under its precision, its optimizer following the
one-cycle learning-rate schedule over all `epochs` x steps (`model.compile_model`,
`schedule.OneCycle`); fit with early stopping, Ctrl-C noted at every batch, classes
weighted with `--class-weight balanced` (`fit_model`); write the model folder with float32
weights and no optimizer state.

Speed: arrays that fit in memory are fed as uint8 through tf.data (shuffled row indices,
a gather per batch, prefetch), standardized inside the model, so there is no float copy of the
dataset; larger arrays stream from their memory maps a batch at a time. One endless
iterator serves the whole run (see `batches`).
On CPUs with native bfloat16 (AVX512-BF16 or AMX) the layers compute in mixed bfloat16
(softmax in float32); the saved and exported models are float32 either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import distribute, paths, plots, progress
from pipeline.artifacts import check_out_dir
from pipeline.data_folder import load_classes, load_prepare_report, load_split
from pipeline.errors import PipelineError, TrainingInterrupted
from pipeline.model_folder import read_history, write_model_folder
from pipeline.native_stderr import import_keras, import_tensorflow
from pipeline.settings import TrainSettings

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # CPU flags for native bfloat16 matrix arithmetic
MIXED_POLICY = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}  # Keras dtype policy per --precision


@dataclass
class TrainingData:
    classes: list[str]
    X_train: np.ndarray  # memory-mapped uint8 rows
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    prepare_report: dict


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


def train_model(data_dir: Path, out_dir: Path, settings: TrainSettings) -> dict:
    """Train, keep the best weights, write the model folder; returns a summary."""
    settings.check()
    settings = dataclasses.replace(settings, learning_rate=settings.peak_learning_rate())  # recorded as used
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    check_out_dir(out_dir, paths.TRAIN_SETTINGS_FILE, {"data folder": data_dir})
    data = load_training_data(data_dir)
    cluster = distribute.read_cluster()  # TF_CONFIG, checked before TensorFlow loads

    # TensorFlow takes seconds to load: only once the inputs are known to be usable.
    progress.say("loading TensorFlow...")
    keras = import_keras()
    from pipeline.model import PixelStats, compile_model

    plan = distribute.plan_training(cluster)  # one process, every local GPU, or the cluster
    keras.utils.set_random_seed(settings.seed)
    precision = resolve_precision(settings.precision, plan)
    input_shape, num_classes = data.X_train.shape[1:], len(data.classes)
    pixel_stats = PixelStats.of(data.X_train)
    steps = (
        settings.epochs * math.ceil(len(data.X_train) / settings.batch_size)
        if settings.schedule == "one-cycle"
        else None
    )
    with plan.strategy.scope():
        model = compile_model(
            build_with_precision(input_shape, num_classes, precision, pixel_stats),
            settings.learning_rate,
            steps,
            settings.warmup,
        )
    in_memory = data.X_train.nbytes + data.X_val.nbytes <= _in_memory_bytes(settings.in_memory_mb)

    with ctrl_c_noted() as ctrl_c, plan.workspace(out_dir) as tmp:  # only the chief writes the model folder
        fit = fit_model(model, data, settings, in_memory, tmp, ctrl_c, plan)
        if fit.best is None:
            raise PipelineError(
                f"training diverged: the {fit.monitor} was never a finite number in {len(fit.history)} epoch(s), "
                "so there is no model to keep and nothing was written; try a lower --learning-rate"
            )
        summary = {
            "epochs_run": len(fit.history),
            "best_epoch": fit.best_epoch,
            "monitor": fit.monitor,
            "best": fit.best,
            "seconds": round(fit.seconds, 2),
            "train_images_per_s": round(len(fit.history) * len(data.X_train) / fit.seconds, 1) if fit.seconds else None,
            "interrupted": fit.interrupted,
            "precision": precision,
            "input": "memory (tf.data)" if in_memory else "memory-mapped batches",
            "class_weights": fit.class_weights,
            "class_weights_from_epoch": class_weights_from_epoch(settings.epochs) + 1 if fit.class_weights else None,
            "pixel_mean": pixel_stats.mean,
            "pixel_variance": pixel_stats.variance,
            **plan.describe(),
            **fit.loop,
        }
        if plan.custom_loop:  # the same on every worker when the replicas stayed in sync
            summary["weights_sha256"] = weights_digest(model)
        if not plan.is_chief:
            summary["role"] = f"worker {plan.rank} of {plan.workers}"
        # Save and export float32 weights (they run the same everywhere) in an uncompiled copy:
        # without Adam's two moments per weight, model.keras is a third the size, saves and loads faster.
        weights = model.get_weights()
        model = build_with_precision(input_shape, num_classes, "float32", pixel_stats)
        model.set_weights(weights)
        if plan.is_chief:
            with plots.TrainingCurvesBeside(tmp / paths.HISTORY_FILE, fit.best_epoch, tmp / paths.CURVES_PNG):
                write_model_folder(tmp, model, data.classes, data_dir, data.prepare_report, settings, summary)
    plan.barrier("the chief wrote the model folder")  # no worker leaves before the model is in place
    where = f"is saved in {out_dir}" if plan.is_chief else "is saved by the chief"
    if fit.interrupted:
        raise TrainingInterrupted(
            f"training interrupted after {summary['epochs_run']} epoch(s); the best model so far (epoch {summary['best_epoch']}) {where}"
        )
    if ctrl_c.pressed:  # after the last batch, as the folder was written: settings.json says not interrupted
        raise TrainingInterrupted(
            f"interrupted after training had finished; the complete model ({summary['epochs_run']} epoch(s), "
            f"best epoch {summary['best_epoch']}) {where}"
        )
    return summary


def load_training_data(data_dir: Path) -> TrainingData:
    """The train and val splits (memory-mapped) and the classes, checked before TensorFlow loads."""
    classes = load_classes(data_dir)
    X_train, y_train = load_split(data_dir, "train", len(classes))
    X_val, y_val = load_split(data_dir, "val", len(classes))
    if len(X_train) == 0:
        raise PipelineError(f"{data_dir} has no training images: prepare again with more images")
    if X_val.shape[1:] != X_train.shape[1:]:
        raise PipelineError(
            f"{data_dir}: train and val images differ in shape ({X_train.shape[1:]} vs {X_val.shape[1:]})"
        )
    return TrainingData(classes, X_train, y_train, X_val, y_val, load_prepare_report(data_dir))


def fit_model(
    model, data: TrainingData, settings: TrainSettings, in_memory: bool, tmp: Path, ctrl_c, plan=None
) -> FitResult:
    """Keras fit with early stopping on the validation loss (the training loss without a
    validation split); the best epoch's weights are back in `model` when it returns. With
    more than one replica (several GPUs, several workers) train_loop's custom step runs
    instead of fit, driving the same callbacks."""
    keras = import_keras()
    from pipeline.callbacks import EpochScalars, epoch_progress

    has_val = len(data.X_val) > 0
    monitor = "val_loss" if has_val else "loss"
    weights = class_weights(data.y_train, len(data.classes)) if settings.class_weight == "balanced" else None
    by_name = dict(zip(data.classes, map(float, weights))) if weights is not None else None
    weighted_from = class_weights_from_epoch(settings.epochs)
    early_stopping = keras.callbacks.EarlyStopping(
        monitor=monitor,
        patience=settings.patience,
        restore_best_weights=True,
        # class weights: neither stopped nor the best kept before the weights weigh the loss,
        # or a run could end, or be restored to an epoch, that the weights never reached
        start_from_epoch=weighted_from if weights is not None else 0,
    )
    callbacks = [
        early_stopping,
        keras.callbacks.TerminateOnNaN(),  # a NaN loss never comes back: stop at once
        keras.callbacks.CSVLogger(str(tmp / paths.HISTORY_FILE)),
        epoch_progress(settings.epochs),
    ]
    if settings.tensorboard:
        callbacks.append(EpochScalars(tmp / paths.TENSORBOARD_DIR))
    if plan is not None and plan.custom_loop:
        from pipeline.train_loop import fit_replicated

        started = time.perf_counter()
        memory = _in_memory_bytes(settings.in_memory_mb)
        interrupted, loop = fit_replicated(
            model, data, settings, plan, callbacks, ctrl_c, memory, has_val, weights, weighted_from
        )
        if interrupted and early_stopping.best_weights is None:  # no epoch finished: nothing to keep
            raise KeyboardInterrupt
        seconds = time.perf_counter() - started
        return _fit_result(model, early_stopping, monitor, tmp, seconds, interrupted, loop, by_name)
    callbacks.append(
        keras.callbacks.LambdaCallback(
            on_train_begin=ctrl_c.check, on_train_batch_end=ctrl_c.check, on_test_batch_end=ctrl_c.check
        )
    )
    train_batches, train_steps = batches(
        data.X_train, data.y_train, settings.batch_size, settings.seed, True, in_memory
    )
    val_batches, val_steps = (
        batches(data.X_val, data.y_val, settings.batch_size, settings.seed, False, in_memory)
        if has_val
        else (None, None)
    )
    if weights is not None:
        train_batches = with_class_weights(train_batches, weights, weighted_from * train_steps)
        if has_val:  # the best epoch by the loss the user asked for, every epoch weighed alike
            val_batches = with_class_weights(val_batches, weights, 0)
    started = time.perf_counter()
    _build_state_before_tracing(model, data.X_train, data.y_train)
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
    return _fit_result(model, early_stopping, monitor, tmp, seconds, interrupted, None, by_name)


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


def weights_digest(model) -> str:
    """sha256 of the float32 weights: equal on every worker that trained in sync."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights, dtype=np.float32).tobytes())
    return digest.hexdigest()


def class_weights(y_train: np.ndarray, num_classes: int) -> np.ndarray:
    """`--class-weight balanced`: n / (classes x count) per class, from the training split's
    counts (augmented copies included, as fit sees them), so every class weighs the same in
    the loss; a class with no training image gets 0 (it has nothing to weigh)."""
    counts = np.bincount(np.asarray(y_train, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return np.round(weights, 6)


def class_weights_from_epoch(epochs: int) -> int:
    """The 0-based epoch from which the class weights weigh the training loss: the second half
    of the budget (deferred re-weighting, as in Cao et al. 2019, "LDAM-DRW"); the validation
    loss that picks the best epoch is weighted in every epoch, and early stopping starts
    watching it at this epoch. Weighted from the first step, the short one-cycle budget spent
    its high-rate epochs on the rare classes' heavy, noisy examples: on the letters with three classes cut to a tenth, 6 epochs, macro F1 fell
    from 0.81-0.85 unweighted to 0.74-0.75; deferred, it was 0.84-0.86 (bench/RESULTS.md)."""
    return epochs // 2


def with_class_weights(dataset, weights: np.ndarray, from_step: int):
    """`dataset`'s (images, labels) batches as (images, labels, per-example weights): each
    example's class weight from batch `from_step` on (0: every batch), 1 before. By the
    batch's position, not a flag set by a callback, so what prefetching has read ahead
    cannot get the other weights."""
    table = import_tensorflow().constant(np.asarray(weights, dtype=np.float32))

    def add_weights(step, batch):
        images, labels = batch
        return images, labels, example_weights(table, labels, step >= from_step)

    return dataset.enumerate().map(add_weights)


def example_weights(table, labels, weighted):
    """Each example's class weight from `table` where `weighted` (a boolean tensor) holds, 1
    where it does not: what fit's batches carry and what the custom step weighs its loss by."""
    tf = import_tensorflow()
    weight = tf.gather(table, labels)
    return tf.where(weighted, weight, tf.ones_like(weight))


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


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_precision(precision: str, plan=None) -> str:
    """auto -> float16 on one GPU; bfloat16 on CPUs with native bf16 arithmetic (measured 1.5-2x
    faster here); else float32."""
    if precision == "auto":
        cpu = "bfloat16" if cpu_flags() & BF16_FLAGS else "float32"
        return distribute.auto_precision(plan.kind, plan.gpus, cpu) if plan is not None else cpu
    return precision


def build_with_precision(input_shape, num_classes: int, precision: str, pixel_stats=None):
    """The model under this precision's dtype policy; the global policy is restored at once."""
    from pipeline.model import build_model

    keras = import_keras()
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(MIXED_POLICY.get(precision, "float32"))
    try:
        return build_model(input_shape, num_classes, pixel_stats)
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


def row_gatherer(X, y, in_memory: bool):
    """A tf.data map function: a batch of row indices -> (uint8 images, int64 labels), gathered
    from one uint8 copy of the rows in memory, or read from the memory map (ascending rows)."""
    tf = import_tensorflow()
    if in_memory:
        images, labels = tf.constant(np.asarray(X)), tf.constant(np.asarray(y, dtype=np.int64))
        return lambda i: (tf.gather(images, i), tf.gather(labels, i))

    def read(i):
        i = np.sort(i)  # ascending reads from the memory map
        return np.asarray(X[i]), np.asarray(y[i], dtype=np.int64)

    def gather(i):
        images, labels = tf.numpy_function(read, [i], (tf.uint8, tf.int64), stateful=False)
        images.set_shape((None, *X.shape[1:]))
        labels.set_shape((None,))
        return images, labels

    return gather


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
    tf = import_tensorflow()
    rows = tf.data.Dataset.range(len(X))
    if shuffle:
        rows = rows.shuffle(len(X), seed=seed, reshuffle_each_iteration=True)
    dataset = rows.batch(batch_size).map(row_gatherer(X, y, in_memory), num_parallel_calls=1).repeat().prefetch(2)
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
