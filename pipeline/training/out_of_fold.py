"""Out-of-fold predicted probabilities: K copies of the project's CNN, each trained on the other folds.

Reads nothing the user keeps and writes nothing the user keeps: the rows come in memory,
each fold's model trains in a temporary folder (fit's history.csv) that is deleted with
it, and only probabilities come back: the held-out fold's, and, once every fold is in, the
doubted images' from the models that trained on them (did they learn those labels?
`data.label_issues` asks); each fold's weights are kept in memory until then. Each fold
trains as `train` does (`training.fit.fit_model`: the one-cycle schedule, train's precision, seeded) for
--epochs, with no validation split: the held-out fold is what it is judged on, and its
labels are the ones in question, so none of them may choose the weights.

On CPUs the folds train side by side, one worker process per core (`fold_plan`), each
with its share of the cores: the folds are independent, and this CNN's steps use two
threads poorly (one fold's fit on two cores took 14.7-16.8 s here; two folds at once, a
core each, 21 s for both: 1.5x the throughput). The rows reach the workers as memory-
mapped .npy files in a temporary folder, and their progress comes back on a queue to one
bar per fold. Where a GPU may be in play the folds train one after the other in this
process, as before: side by side they would share one device's memory.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import queue
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import progress
from pipeline.core.native_stderr import import_keras, import_tensorflow
from pipeline.core.settings import INFERENCE_BATCH, AuditSettings, TrainSettings
from pipeline.data.data_folder import TrainingData
from pipeline.data.worker_pool import available_cores
from pipeline.training.batches import available_memory
from pipeline.training.fold_progress import FoldBoard, fold_reporter

WORKER_BYTES = 700 * 2**20  # a worker with TensorFlow and Keras loaded, before its fold's rows
ROWS_COPIES = 3  # a fold's rows in a worker: the numpy copy, fit's in-memory tensor, slack
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")  # CUDA, WSL's, ROCm's
ROW_FILES = ("X", "labels", "X_augmented", "augmented_source", "fold_of")


@dataclass
class FoldRows:
    """Every source image once, and the augmented copies prepare made of some of them."""

    X: np.ndarray  # uint8 rows of the source images
    labels: np.ndarray  # their given labels
    X_augmented: np.ndarray  # uint8 rows of the augmented copies
    augmented_source: np.ndarray  # for each copy, the position of its source in X


@dataclass(frozen=True)
class FoldPlan:
    workers: int  # processes training folds side by side; 1: one after the other, in this process
    threads: int  # TensorFlow threads per worker (0: TensorFlow's own choice, in this process)


def fold_plan(folds: int, fold_bytes: int) -> FoldPlan:
    """One worker per core, up to one per fold and as many as memory holds, each with an
    equal share of the cores; in this process where a GPU may be in play or one core is all."""
    cores = available_cores()
    if cores < 2 or gpu_possible():
        return FoldPlan(1, 0)
    workers = min(folds, cores, max(1, available_memory() // (WORKER_BYTES + ROWS_COPIES * fold_bytes)))
    return FoldPlan(workers, max(1, cores // workers)) if workers > 1 else FoldPlan(1, 0)


def gpu_possible() -> bool:
    """Whether TensorFlow might find a GPU here, judged without loading it (in this process it
    would load for nothing: the workers load their own): an NVIDIA, WSL or ROCm device file,
    unless CUDA_VISIBLE_DEVICES hides every device; and on macOS, the Metal plugin."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False
    return sys.platform == "darwin" or any(os.path.exists(path) for path in GPU_DEVICE_FILES)


@dataclass
class OutOfFold:
    probabilities: np.ndarray  # row i's, from the model that never saw it nor a near-duplicate or copy of it
    # row i's, the mean of the other folds' models, which trained on it with its label: for
    # the rows `doubted` asked about, NaN elsewhere
    in_sample: np.ndarray
    folds: list[dict]  # one summary per fold
    plan: FoldPlan  # how they were trained


def out_of_fold_probabilities(
    rows: FoldRows, fold_of: np.ndarray, classes: list[str], s: AuditSettings, doubted: Callable | None = None
) -> OutOfFold:
    """Every row's out-of-fold probabilities; and, for the rows doubted(probabilities) picks
    (a boolean mask), their in-sample ones: whether the models that trained on them learned
    their labels (a wrong label is learned late or never; a hard picture with the right label,
    like others the models trained on, is learned). Each fold's weights are kept until then,
    so each model predicts only the doubted rows it trained on, not every one (on the
    letters about 200 against 2,652 a fold: too little time to show beside a run's own
    spread there; on a larger folder every row would be a pass over most of it per fold)."""
    folds = int(fold_of.max()) + 1
    fold_bytes = (rows.X.nbytes + rows.X_augmented.nbytes) * (folds - 1) // folds
    plan = fold_plan(folds, fold_bytes)
    probabilities = np.zeros((len(rows.X), len(classes)), dtype=np.float64)
    in_sample = np.full_like(probabilities, np.nan)
    summaries = []

    def take(fold: int, held_out_probabilities: np.ndarray, summary: dict) -> None:
        probabilities[fold_of == fold] = held_out_probabilities
        summaries.append(summary)

    @functools.cache
    def wanted() -> np.ndarray:  # the rows to predict in sample, asked once every fold is in
        return np.flatnonzero(doubted(probabilities)) if doubted else np.zeros(0, dtype=np.int64)

    with FoldBoard(folds) as board:
        if plan.workers == 1:
            progress.say("loading TensorFlow...")
            kept = {}
            for fold in range(folds):
                *result, kept[fold] = _run_fold(rows, fold_of, fold, classes, s, board.handle)
                take(*result)
            answers = [_predict_trained_on(kept[fold], rows.X, fold_of, fold, wanted()) for fold in range(folds)]
        else:
            progress.say(
                f"training the {folds} folds {plan.workers} at a time, in worker processes of "
                f"{plan.threads} thread{'s' if plan.threads > 1 else ''} each (TensorFlow loads in each)"
            )
            answers = _in_workers(rows, fold_of, classes, s, plan, board.handle, take, wanted)
    if len(wanted()):
        in_sample[wanted()] = 0.0
        for _fold, rows_asked, predicted in sorted(answers, key=lambda answer: answer[0]):  # one sum order
            in_sample[rows_asked] += predicted
        in_sample[wanted()] /= max(folds - 1, 1)  # each row trained in all folds but its own
    return OutOfFold(probabilities, in_sample, sorted(summaries, key=lambda summary: summary["fold"]), plan)


def _run_fold(rows: FoldRows, fold_of: np.ndarray, fold: int, classes, s: AuditSettings, send: Callable):
    """(fold, the held-out rows' probabilities, the fold's summary, its weights kept): one model
    trained on the other folds and the augmented copies of their images, then thrown away."""
    keras = import_keras()
    held_out = np.flatnonzero(fold_of == fold)
    trained_on = np.flatnonzero(fold_of != fold)
    copies = np.flatnonzero(fold_of[rows.augmented_source] != fold)  # copies train only beside their source
    X = np.concatenate([rows.X[trained_on], rows.X_augmented[copies]])
    y = np.concatenate([rows.labels[trained_on], rows.labels[rows.augmented_source[copies]]])
    about = f"training on {len(X)} images ({len(copies)} augmented), predicting {len(held_out)} held out"
    send(("begin", fold, about, s.epochs * math.ceil(len(X) / s.batch_size)))
    model, fit, precision, stats = _train_one(X, y, classes, s, s.seed + fold, fold_reporter(send, fold, s.epochs))
    held_out_probabilities = _predict(model, np.asarray(rows.X[held_out]))
    kept = KeptModel(X.shape[1:], len(classes), precision, stats, model.get_weights())
    send(("end", fold))
    summary = {
        "fold": fold + 1,
        "trained_on": len(X),
        "held_out": len(held_out),
        "epochs_run": len(fit.history),
        "seconds": round(fit.seconds, 2),
        # with the given labels, errors and all
        "held_out_agreement": round(float(np.mean(held_out_probabilities.argmax(1) == rows.labels[held_out])), 4),
        "precision": model.dtype_policy.name,
    }
    del model
    keras.backend.clear_session()  # K models in one process: free each one's graph
    return fold, held_out_probabilities, summary, kept


@dataclass
class KeptModel:
    """A fold's model as weights, until the doubted rows' in-sample probabilities are asked
    for (K live models in one process would need their graphs kept too)."""

    input_shape: tuple
    num_classes: int
    precision: str  # as resolved for training: the same dtype policy predicts
    stats: object  # training.model.PixelStats of its training rows
    weights: list


def _predict_trained_on(kept: KeptModel, X: np.ndarray, fold_of: np.ndarray, fold: int, asked: np.ndarray):
    """(fold, the asked rows this fold's model trained on, its probabilities for them)."""
    from pipeline.training.precision import build_with_precision

    rows = asked[fold_of[asked] != fold]
    if not len(rows):
        return fold, rows, np.zeros((0, kept.num_classes))
    model = build_with_precision(kept.input_shape, kept.num_classes, kept.precision, kept.stats)
    model.set_weights(kept.weights)
    predicted = _predict(model, np.asarray(X[rows]))
    del model
    import_keras().backend.clear_session()
    return fold, rows, predicted


def _predict(model, X: np.ndarray) -> np.ndarray:
    """The model's probabilities, called eagerly a batch at a time: a new model's predict()
    traced a new function per fold, and TensorFlow warned of retracing on the terminal."""
    batches = [model(X[i : i + INFERENCE_BATCH], training=False) for i in range(0, len(X), INFERENCE_BATCH)]
    return np.concatenate([np.asarray(b, dtype=np.float64) for b in batches])


def _train_one(X: np.ndarray, y: np.ndarray, classes: list[str], s: AuditSettings, seed: int, reporter=None):
    """(model, fit, precision, pixel stats): one fold's CNN, trained as `train` trains it on a
    budget of s.epochs."""
    from pipeline.training.fit import ctrl_c_noted, fit_model
    from pipeline.training.model import PixelStats, compile_model
    from pipeline.training.precision import build_with_precision, resolve_precision

    keras = import_keras()
    precision = resolve_precision(s.precision)
    settings = TrainSettings(
        epochs=s.epochs, batch_size=s.batch_size, seed=seed, patience=s.epochs, precision=precision
    )
    keras.utils.set_random_seed(seed)
    stats = PixelStats.of(X)
    steps = s.epochs * math.ceil(len(X) / s.batch_size)
    model = compile_model(
        build_with_precision(X.shape[1:], len(classes), precision, stats),
        settings.peak_learning_rate(),
        steps,
        settings.warmup,
    )
    data = TrainingData(classes, X, y, X[:0], y[:0], {})
    with ctrl_c_noted() as ctrl_c, tempfile.TemporaryDirectory(prefix="pipeline-audit-") as tmp:
        fit = fit_model(model, data, settings, True, Path(tmp), ctrl_c, epoch_progress=reporter)
    if fit.interrupted:
        raise KeyboardInterrupt  # a fold cut short would rank its images on half a model
    return model, fit, precision, stats


# --- the folds in worker processes ---


def _in_workers(
    rows: FoldRows, fold_of: np.ndarray, classes, s: AuditSettings, plan: FoldPlan, show, take, wanted
) -> list[tuple]:
    """The folds in worker processes, fold k in worker k mod workers: take(fold, probabilities,
    summary) as each fold's result comes; once all are in, each worker predicts the wanted()
    rows its folds' models trained on, and those answers are returned. A worker that fails or
    dies ends the audit; so does Ctrl-C, all workers stopped."""
    folds = int(fold_of.max()) + 1
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: TensorFlow does not survive fork
    messages = context.Queue()
    with tempfile.TemporaryDirectory(prefix="pipeline-audit-rows-") as rows_dir:
        for name, array in zip(ROW_FILES, (rows.X, rows.labels, rows.X_augmented, rows.augmented_source, fold_of)):
            np.save(os.path.join(rows_dir, f"{name}.npy"), np.ascontiguousarray(array))
        asks = [context.Queue() for _ in range(plan.workers)]  # the rows to predict in sample, one per worker
        workers = [
            context.Process(
                target=_worker_main,
                args=(rows_dir, list(range(w, folds, plan.workers)), classes, s, plan.threads, messages, asks[w]),
                daemon=True,
                name=f"pipeline-audit-{w + 1}",
            )
            for w in range(plan.workers)
        ]
        for worker in workers:
            worker.start()
        try:
            for result in _collect(messages, workers, folds, show, "result"):
                take(*result)
            asked = wanted()
            for ask in asks:
                ask.put(asked)
            return list(_collect(messages, workers, folds, show, "in_sample"))
        finally:
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
            for worker in workers:
                worker.join()


def _collect(messages, workers, folds: int, show: Callable, kind: str) -> Iterator[tuple]:
    """The `kind` messages' contents, one per fold, as they come; progress goes to show."""
    done = 0
    while done < folds:
        try:
            message = messages.get(timeout=0.5)
        except queue.Empty:
            message = None
        if message is None:
            ended = [w for w in workers if w.exitcode not in (None, 0)]
            if ended:  # killed (out of memory?) without a word: its folds would never come
                raise RuntimeError(
                    f"audit worker process {ended[0].name} ended with exit code {ended[0].exitcode} "
                    "before its folds were done (out of memory?)"
                )
            continue
        if message[0] == kind:
            done += 1
            yield message[1:]
        elif message[0] == "error":
            raise RuntimeError(f"an audit worker process failed:\n{message[2]}")
        else:
            show(message)


def _worker_main(rows_dir: str, my_folds: list[int], classes, s: AuditSettings, threads: int, messages, ask) -> None:
    """A worker process: train its folds on the memory-mapped rows, one after the other; then
    wait for the rows to predict with them in sample."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops us
    _limit_threads(threads)
    progress.set_quiet(True)  # everything the user sees goes through the parent
    try:
        loaded = {name: np.load(os.path.join(rows_dir, f"{name}.npy"), mmap_mode="r", allow_pickle=False)
                  for name in ROW_FILES}  # fmt: skip
        rows = FoldRows(loaded["X"], np.asarray(loaded["labels"]), loaded["X_augmented"],
                        np.asarray(loaded["augmented_source"]))  # fmt: skip
        fold_of = np.asarray(loaded["fold_of"])
        kept = {}
        for fold in my_folds:
            *result, kept[fold] = _run_fold(rows, fold_of, fold, classes, s, messages.put)
            messages.put(("result", *result))
        asked = ask.get()
        for fold in my_folds:
            messages.put(("in_sample", *_predict_trained_on(kept[fold], rows.X, fold_of, fold, asked)))
    except KeyboardInterrupt:
        sys.exit(130)  # the parent is stopping the audit
    except BaseException:
        messages.put(("error", my_folds[0], traceback.format_exc()))
        sys.exit(1)


def _limit_threads(threads: int) -> None:
    """TensorFlow's thread pools at `threads`, set before it starts them."""
    for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ[name] = str(threads)
    tf = import_tensorflow()
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
