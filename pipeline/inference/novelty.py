"""The novelty score: how unlike the training images a picture is, read from the network's own features.

Pure numpy on feature vectors (the second output of every engine, model_folder.inference_model).
Train writes, into the model folder, novelty.json (the method and its version, k, the threshold
and how it was set, the validation figures) and novelty_features.npy (float16: the L2-normalised
features of up to MAX_BANK training source images, evenly drawn); `load_novelty` reads them back
without pickle.

- The score (`Novelty.scores`): the distance from a picture's L2-normalised features to the k-th
  nearest L2-normalised training feature (Sun et al. 2022, "Out-of-distribution detection with
  deep nearest neighbors"; OpenOOD's KNN postprocessor): 0 for a training image itself, at most
  2. Higher is less like the training images. k = 1 and the training split's source images (not
  its augmented copies) measured best (docs/unknown.md, bench/unknown_bench.py).
- The threshold (`fit_novelty`): the lowest validation score that keeps at least `keep` of the
  validation split's pictures (0.99); without a validation split, of the training images'
  distances to their nearest other training image, said so in novelty.json.
- `foreign_report`: evaluate --foreign's figures in OpenOOD's terms: AUROC (known pictures
  against foreign ones), the share of foreign pictures accepted at 95 % of known ones kept
  (FPR@95%TPR), and at the threshold the share of foreign accepted and of known refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import paths
from pipeline.core.artifacts import atomic_file, load_array, read_json, write_json
from pipeline.core.errors import PipelineError

NOVELTY_VERSION = 1  # novelty.json's format and the score's definition; a folder of another is not scored
K = 1  # the k-th nearest training feature
ENGINE_MARGIN = 1e-4  # added to the threshold: scores of one picture by two engines differ by ~1e-6
KEEP = 0.99  # the default threshold keeps this share of validation pictures
MAX_BANK = 8192  # training features kept at most (evenly drawn): 9 MB at the CNN's 576 dimensions
HISTOGRAM_BINS = 30
UNKNOWN = "unknown"  # the label of a picture whose novelty is above the threshold
_CHUNK = 256  # pictures scored at once: a chunk x bank matrix of distances at a time


def normalised(features: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (an all-zero row stays zero), in float32."""
    f = np.asarray(features, dtype=np.float32)
    if f.ndim != 2:
        f = f.reshape(len(f), -1)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    return f / np.maximum(norms, 1e-12)


@dataclass
class Novelty:
    """A model folder's novelty: the training features and the threshold set on validation."""

    bank: np.ndarray  # (n, dimensions) float32, L2-normalised training features
    k: int
    threshold: float
    info: dict  # novelty.json as written

    @property
    def dimensions(self) -> int:
        return int(self.bank.shape[1])

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Distance to the k-th nearest training feature, float64 (N,). The neighbours are
        found by dot product, then their distances computed as differences, not as
        sqrt(2 - 2 cos), which loses every digit near 0 (an engine's rounding would show)."""
        return knn_distances(self.bank, normalised(features), self.k)


def knn_distances(bank: np.ndarray, queries: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """For each L2-normalised query row, the Euclidean distance to its k-th nearest bank row
    (`exclude_self`: the queries are the bank, each row's own distance left out)."""
    found = np.empty(len(queries), dtype=np.float64)
    if len(queries) == 0:
        return found
    if queries.shape[1] != bank.shape[1]:
        raise PipelineError(
            f"the model gives {queries.shape[1]} features but its novelty was fitted on {bank.shape[1]}: train again"
        )
    kth = min(k + int(exclude_self), len(bank))
    for start in range(0, len(queries), _CHUNK):
        q = queries[start : start + _CHUNK]
        similarity = q @ bank.T
        if exclude_self:
            similarity[np.arange(len(q)), np.arange(start, start + len(q))] = -np.inf
        nearest = np.argpartition(-similarity, kth - 1, axis=1)[:, :kth]
        distances = np.linalg.norm(q[:, None, :].astype(np.float64) - bank[nearest].astype(np.float64), axis=2)
        if exclude_self:
            distances[nearest == np.arange(start, start + len(q))[:, None]] = np.inf
        found[start : start + len(q)] = np.sort(distances, axis=1)[:, min(k, kth) - 1]
    return found


def nearest(k: int) -> str:
    """'nearest', '2nd nearest', '3rd nearest', '5th nearest': the words for k."""
    if k == 1:
        return "nearest"
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix} nearest"


def even_rows(n: int, cap: int) -> np.ndarray:
    """Up to `cap` row indices evenly spread over n rows: the same ones every run."""
    return np.unique(np.linspace(0, n - 1, min(n, cap)).astype(np.int64)) if n else np.zeros(0, np.int64)


def fit_novelty(
    train_features: np.ndarray, val_features: np.ndarray, keep: float = KEEP, k: int = K, described: str = ""
) -> tuple[np.ndarray, dict]:
    """The bank (float16, as written) and novelty.json's content, from the training source images'
    features (up to MAX_BANK of them, evenly drawn: pass them in their split order) and the
    validation split's, whose `keep` quantile is the threshold."""
    if len(train_features) == 0:
        raise PipelineError("no training features to fit the novelty score on")
    bank = normalised(train_features[even_rows(len(train_features), MAX_BANK)])
    stored = bank.astype(np.float16)
    bank = normalised(stored)  # score validation exactly as a loaded folder will
    if len(val_features):
        val_scores, set_on = knn_distances(bank, normalised(val_features), k), "validation"
    else:  # each training image's distance to its nearest other one: a little closer than an unseen image's
        val_scores, set_on = knn_distances(bank, bank, k, exclude_self=True), "training (no validation split)"
    # the lowest score that keeps at least `keep` of them (an order statistic: of 6 validation
    # pictures, 99 % keeps all 6, where an interpolated quantile would refuse the farthest)
    finite = len(val_scores) and np.isfinite(val_scores).all()
    # plus ENGINE_MARGIN: the picture at the threshold is kept by every engine, not only by the one
    # that scored it here (LiteRT and Keras differ in the sixth decimal, enough to flip it)
    threshold = float(np.quantile(val_scores, keep, method="inverted_cdf")) + ENGINE_MARGIN if finite else 0.0
    info = {
        "version": NOVELTY_VERSION,
        "method": "knn",
        "k": k,
        "features": described,
        "dimensions": int(bank.shape[1]),
        "bank_images": int(len(bank)),
        "training_sources": int(len(train_features)),
        "keep": keep,
        "set_on": set_on,
        "set_on_images": int(len(val_scores)),
        "threshold": threshold,  # not rounded: a rounding down would refuse the picture it keeps
        "scores": _summary(val_scores),
        "reference": "Sun et al. 2022, Out-of-distribution detection with deep nearest neighbors",
    }
    return stored, info


def _summary(scores: np.ndarray) -> dict:
    if len(scores) == 0:
        return {}
    quantiles = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
    return {**{name: round(float(np.quantile(scores, q)), 6) for name, q in quantiles.items()},
            "max": round(float(np.max(scores)), 6)}  # fmt: skip


def write_novelty(folder: Path, bank: np.ndarray, info: dict) -> None:
    """novelty_features.npy and novelty.json into the model folder train is writing."""
    folder = Path(folder)
    with atomic_file(folder / paths.NOVELTY_FEATURES_FILE) as where:
        np.save(where, np.ascontiguousarray(bank, dtype=np.float16), allow_pickle=False)
    write_json(folder / paths.NOVELTY_FILE, info)


def load_novelty(model_dir: Path) -> tuple[Novelty | None, str | None]:
    """The model folder's novelty, or None and the reason there is none (a folder trained
    before novelty existed, or by a pipeline with another version of it)."""
    model_dir = Path(model_dir)
    where = model_dir / paths.NOVELTY_FILE
    if not where.is_file():
        return None, (
            f"{model_dir} has no {paths.NOVELTY_FILE} (trained before novelty scores): no picture is "
            "answered 'unknown'; train again to get them"
        )
    info = read_json(where, paths.TRAIN_HINT)
    if not isinstance(info, dict) or info.get("version") != NOVELTY_VERSION:
        version = info.get("version") if isinstance(info, dict) else None
        return None, (
            f"{where} is of novelty version {version}, this pipeline scores version {NOVELTY_VERSION}: "
            "no picture is answered 'unknown'; train again"
        )
    bank = load_array(model_dir / paths.NOVELTY_FEATURES_FILE, paths.TRAIN_HINT, mmap=False)
    threshold, k = info.get("threshold"), info.get("k")
    if bank.ndim != 2 or not len(bank) or not isinstance(k, int) or k < 1 or not isinstance(threshold, (int, float)):
        raise PipelineError(f"{where} and {paths.NOVELTY_FEATURES_FILE} do not make a novelty score: train again")
    return Novelty(normalised(bank), k, float(threshold), info), None


def auroc(known: np.ndarray, foreign: np.ndarray) -> float:
    """The area under the ROC curve of the score telling foreign pictures (positive) from known ones."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(known)), np.ones(len(foreign))]
    return float(roc_auc_score(labels, np.r_[known, foreign]))


def auroc_noise(area: float, n_known: int, n_foreign: int) -> float:
    """The standard error of an AUROC from so many pictures (Hanley and McNeil 1982)."""
    q1, q2 = area / (2 - area), 2 * area**2 / (1 + area)
    variance = (area * (1 - area) + (n_foreign - 1) * (q1 - area**2) + (n_known - 1) * (q2 - area**2)) / max(
        n_known * n_foreign, 1
    )
    return float(np.sqrt(max(variance, 0.0)))


def share_noise(share: float, n: int) -> float:
    """The standard error of a share of n pictures (binomial); what chance alone moves it by."""
    return float(np.sqrt(share * (1 - share) / n)) if n else float("nan")


def foreign_report(known: np.ndarray, foreign: np.ndarray, threshold: float) -> dict:
    """How well a score tells `foreign` pictures from `known` (test) ones, in OpenOOD's terms,
    and what `threshold` does (0: none, nothing refused), each share with its standard error."""
    known, foreign = np.asarray(known, dtype=np.float64), np.asarray(foreign, dtype=np.float64)
    area = auroc(known, foreign)
    fpr = float(np.mean(foreign <= np.quantile(known, 0.95)))  # FPR@95%TPR: foreign kept at 95 % of known kept
    accepted = float(np.mean(foreign <= threshold)) if threshold > 0 else 1.0
    refused = float(np.mean(known > threshold)) if threshold > 0 else 0.0
    return {
        "n_known": int(len(known)),
        "n_foreign": int(len(foreign)),
        "auroc": round(area, 6),
        "auroc_se": round(auroc_noise(area, len(known), len(foreign)), 6),
        "fpr_at_95_tpr": round(fpr, 6),
        "fpr_at_95_tpr_se": round(share_noise(fpr, len(foreign)), 6),
        "threshold": threshold,
        "foreign_accepted": round(accepted, 6),
        "foreign_accepted_se": round(share_noise(accepted, len(foreign)), 6),
        "known_refused": round(refused, 6),
        "known_refused_se": round(share_noise(refused, len(known)), 6),
    }


def histogram(known: np.ndarray, foreign: np.ndarray | None, bins: int = HISTOGRAM_BINS) -> dict:
    """Counts of both over the same bins, for metrics.json and the report's figure."""
    values = np.r_[known, foreign if foreign is not None else []]
    edges = np.histogram_bin_edges(values, bins=bins) if len(values) else np.linspace(0, 1, bins + 1)
    return {
        "edges": [round(float(e), 6) for e in edges],
        "known": np.histogram(known, edges)[0].tolist(),
        "foreign": np.histogram(foreign, edges)[0].tolist() if foreign is not None else None,
    }


def novelty_report(
    novelty: Novelty | None,
    threshold: float,
    test_scores: np.ndarray | None,
    test_confidence: np.ndarray,
    foreign_scores: np.ndarray | None = None,
    foreign_confidence: np.ndarray | None = None,
    foreign_folder: str | None = None,
    note: str | None = None,
) -> dict:
    """metrics.json's `novelty`: the threshold and how it was set, the share of test pictures it
    refuses, and with a foreign folder how well the score tells them apart (novelty against the
    max-softmax baseline, 1 - the calibrated confidence), with both histograms."""
    if novelty is None or test_scores is None:
        return {"available": False, "note": note}
    refused = float(np.mean(test_scores > threshold)) if threshold > 0 and len(test_scores) else 0.0
    report = {
        "available": True,
        "method": f"distance to the {nearest(novelty.k)} training image's features ({novelty.info.get('features', '')})",
        "threshold": threshold,
        "set_on": novelty.info.get("set_on"),
        "keep": novelty.info.get("keep"),
        "test_refused": round(refused, 6),
        "test_refused_se": round(share_noise(refused, len(test_scores)), 6),
        "test_scores": _summary(test_scores),
        "foreign": None,
        "histogram": histogram(test_scores, foreign_scores),
    }
    if foreign_scores is not None and foreign_confidence is not None and len(foreign_scores):
        baseline = foreign_report(1 - test_confidence, 1 - foreign_confidence, 0.0)
        report["foreign"] = {
            "folder": foreign_folder,
            **foreign_report(test_scores, foreign_scores, threshold),
            "baseline": {
                "score": "1 - max softmax (calibrated)",
                **{k: baseline[k] for k in ("auroc", "auroc_se", "fpr_at_95_tpr", "fpr_at_95_tpr_se")},
            },
        }
    return report
