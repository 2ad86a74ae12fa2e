"""train --backbone's step 2 (fit_head's five L2 strengths), each fit from zero against each
from the last (warm_start), on one prepared folder's cached frozen features: seconds, the
strength chosen, its validation log loss, and the head alone's test accuracy; alternating
pairs, medians.

    python bench/backbone_head_warm_start.py DATA_DIR [--pairs 3]

DATA_DIR is a `prepare --size 224` folder that `train --backbone efficientnet-lite0` has run on
(its features are read from the cache; the test split's are computed once).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from pipeline.training.backbone import (
    HEAD_C,
    build_network,
    cache_folder,
    class_probabilities,
    cut_activations,
    pooled_features,
)


def heads(Z: dict, y: dict, num_classes: int, warm: bool) -> dict:
    started, best = time.perf_counter(), None
    fitting = LogisticRegression(C=HEAD_C[0], max_iter=1000, warm_start=True)
    for C in HEAD_C:
        if warm:
            head = copy.deepcopy(fitting.set_params(C=C).fit(Z["train"], y["train"]))
        else:
            head = LogisticRegression(C=C, max_iter=1000).fit(Z["train"], y["train"])
        loss = log_loss(y["val"], class_probabilities(head, Z["val"], num_classes), labels=range(num_classes))
        if best is None or loss < best[1]:
            best = (head, loss, C)
    head, loss, C = best
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "C": C,
        "val_log_loss": round(float(loss), 4),
        "test_accuracy": round(float(np.mean(head.predict(Z["test"]) == y["test"])), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    splits = ("train", "val", "test")
    X = {s: np.load(args.data / f"X_{s}.npy", mmap_mode="r") for s in splits}
    y = {s: np.load(args.data / f"y_{s}.npy") for s in splits}
    classes = json.loads((args.data / "classes.json").read_text())
    settings = json.loads((args.data / "report.json").read_text()).get("settings", {})
    network = build_network("efficientnet-lite0", X["train"].shape[1:], len(classes))
    folder = cache_folder(args.data, settings, network)
    F = {s: pooled_features(network, cut_activations(network, X[s], folder, f"features ({s})")) for s in splits}
    mean, scale = F["train"].mean(axis=0), F["train"].std(axis=0) + 1e-6  # as fit_head standardizes
    Z = {s: (F[s] - mean) / scale for s in splits}
    pairs = []
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        pair = {warm: heads(Z, y, len(classes), warm) for warm in order}
        pairs.append(pair)
        print(json.dumps({"pair": i, "cold": pair[False], "warm": pair[True]}), flush=True)
    cold = statistics.median(p[False]["seconds"] for p in pairs)
    warm = statistics.median(p[True]["seconds"] for p in pairs)
    ratio = statistics.median(p[True]["seconds"] / p[False]["seconds"] for p in pairs)
    print(json.dumps({"rows": int(len(Z["train"])), "cold_s": cold, "warm_s": warm, "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
