"""Out-of-fold predicted probabilities: K copies of the project's CNN, each trained on the other folds.

Reads nothing from disk and writes nothing the user keeps: the rows come in memory, each
fold's model trains in a temporary folder (fit's history.csv) that is deleted with it,
and only the held-out fold's probabilities come back. Each fold trains as `train` does
(`training.fit.fit_model`: the one-cycle schedule, train's precision, seeded) for
--epochs, with no validation split: the held-out fold is what it is judged on, and its labels
are the ones in question, so none of them may choose the weights.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import progress
from pipeline.core.native_stderr import import_keras
from pipeline.core.settings import INFERENCE_BATCH, AuditSettings, TrainSettings
from pipeline.data.data_folder import TrainingData


@dataclass
class FoldRows:
    """Every source image once, and the augmented copies prepare made of some of them."""

    X: np.ndarray  # uint8 rows of the source images
    labels: np.ndarray  # their given labels
    X_augmented: np.ndarray  # uint8 rows of the augmented copies
    augmented_source: np.ndarray  # for each copy, the position of its source in X


def out_of_fold_probabilities(
    rows: FoldRows, fold_of: np.ndarray, classes: list[str], s: AuditSettings
) -> tuple[np.ndarray, list[dict]]:
    """(probabilities, one summary per fold): row i's probabilities from the model that
    never saw it nor any near-duplicate or augmented copy of it."""
    keras = import_keras()
    probabilities = np.zeros((len(rows.X), len(classes)), dtype=np.float64)
    summaries = []
    folds = int(fold_of.max()) + 1
    for fold in range(folds):
        held_out = np.flatnonzero(fold_of == fold)
        trained_on = np.flatnonzero(fold_of != fold)
        copies = np.flatnonzero(fold_of[rows.augmented_source] != fold)  # copies train only beside their source
        X = np.concatenate([rows.X[trained_on], rows.X_augmented[copies]])
        y = np.concatenate([rows.labels[trained_on], rows.labels[rows.augmented_source[copies]]])
        progress.say(
            f"fold {fold + 1}/{folds}: training on {len(X)} images ({len(copies)} augmented), "
            f"predicting {len(held_out)} held out"
        )
        model, fit = _train_one(X, y, classes, s, seed=s.seed + fold)
        probabilities[held_out] = _predict(model, rows.X[held_out])
        held_accuracy = float(np.mean(probabilities[held_out].argmax(1) == rows.labels[held_out]))
        summaries.append(
            {
                "fold": fold + 1,
                "trained_on": len(X),
                "held_out": len(held_out),
                "epochs_run": len(fit.history),
                "seconds": round(fit.seconds, 2),
                "held_out_agreement": round(held_accuracy, 4),  # with the given labels, errors and all
                "precision": model.dtype_policy.name,
            }
        )
        del model
        keras.backend.clear_session()  # K models in one process: free each one's graph
    return probabilities, summaries


def _predict(model, X: np.ndarray) -> np.ndarray:
    """The model's probabilities, called eagerly a batch at a time: a new model's predict()
    traced a new function per fold, and TensorFlow warned of retracing on the terminal."""
    batches = [model(X[i : i + INFERENCE_BATCH], training=False) for i in range(0, len(X), INFERENCE_BATCH)]
    return np.concatenate([np.asarray(b, dtype=np.float64) for b in batches])


def _train_one(X: np.ndarray, y: np.ndarray, classes: list[str], s: AuditSettings, seed: int):
    """One fold's CNN, trained as `train` trains it on a budget of s.epochs."""
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
        fit = fit_model(model, data, settings, True, Path(tmp), ctrl_c)
    if fit.interrupted:
        raise KeyboardInterrupt  # a fold cut short would rank its images on half a model
    return model, fit
