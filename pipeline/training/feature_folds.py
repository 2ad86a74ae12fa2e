"""audit --backbone: out-of-fold heads on a pretrained network's frozen features, in seconds.

Where `training.out_of_fold` trains K copies of the CNN, a backbone audit computes the
frozen network's pooled features of every row once (cached by content with train's, so
the training rows that `train --backbone` saw cost nothing again) and fits K
multinomial logistic regressions on them, each on the other folds' rows and their
augmented copies, each predicting its held-out fold; the doubted rows are predicted in
sample by the K - 1 heads that trained on them, as out_of_fold does. The heads are
scikit-learn's (L-BFGS, standardized features), deterministic for a given fold split.
Returns out_of_fold's `OutOfFold`, so audit reads both alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.core import progress
from pipeline.core.settings import AuditSettings
from pipeline.training.out_of_fold import FoldPlan, FoldRows, OutOfFold

HEAD_C = 0.5  # inverse L2 strength of each fold's logistic head on standardized features


def out_of_fold_heads(
    rows: FoldRows,
    fold_of: np.ndarray,
    classes: list[str],
    s: AuditSettings,
    data_dir: Path,
    prepare_settings: dict,
    doubted: Callable | None = None,
) -> OutOfFold:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.training.backbone import (
        build_network,
        cache_folder,
        class_probabilities,
        cut_activations,
        pooled_features,
    )

    progress.say("loading TensorFlow...")
    network = build_network(s.backbone, rows.X.shape[1:], len(classes))
    folder = cache_folder(data_dir, prepare_settings, network)
    started = time.perf_counter()
    F = pooled_features(network, cut_activations(network, rows.X, folder, "features (every split)"))
    F_augmented = pooled_features(network, cut_activations(network, rows.X_augmented, folder, "features (augmented)"))
    features_seconds = time.perf_counter() - started
    folds = int(fold_of.max()) + 1
    probabilities = np.zeros((len(rows.X), len(classes)), dtype=np.float64)
    heads, summaries = {}, []
    copy_fold = fold_of[rows.augmented_source] if len(rows.augmented_source) else np.zeros(0, np.int64)
    for fold in progress.track(range(folds), folds, "fold heads"):
        started = time.perf_counter()
        train, copies = fold_of != fold, copy_fold != fold
        X = np.concatenate([F[train], F_augmented[copies]])
        y = np.concatenate([rows.labels[train], rows.labels[rows.augmented_source[copies]]])
        head = make_pipeline(StandardScaler(), LogisticRegression(C=HEAD_C, max_iter=2000))
        head.fit(X, y)
        heads[fold] = head
        probabilities[fold_of == fold] = class_probabilities(head, F[fold_of == fold], len(classes))
        summaries.append(
            {
                "fold": fold + 1,
                "trained_on": int(len(X)),
                "held_out": int((~train).sum()),
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
    summaries[0]["features_seconds"] = round(features_seconds, 2)
    in_sample = np.full_like(probabilities, np.nan)
    wanted = np.flatnonzero(doubted(probabilities)) if doubted else np.zeros(0, np.int64)
    if len(wanted):
        in_sample[wanted] = 0.0
        for fold in range(folds):  # each doubted row, by the heads that trained on it
            asked = wanted[fold_of[wanted] != fold]
            in_sample[asked] += class_probabilities(heads[fold], F[asked], len(classes))
        in_sample[wanted] /= max(folds - 1, 1)
    return OutOfFold(probabilities, in_sample, summaries, FoldPlan(1, 0))
