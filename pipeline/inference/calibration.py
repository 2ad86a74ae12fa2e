"""Calibration: one temperature fitted on the validation split, and how far to trust a confidence.

Pure numpy on arrays of probabilities; reads and writes nothing (train records what
`calibrate_on_validation` returns in the model folder's calibration.json, through
model_folder.write_model_folder; evaluate reports the rest in metrics.json).

- `fit_temperature`: the T minimising the negative log-likelihood of softmax(log p / T)
  on the validation split (Guo et al. 2017, temperature scaling). T > 1 softens an
  over-confident model; dividing every logit by the same T keeps each argmax, so no
  predicted class changes.
- `checked_temperature`: that T; one below 1 (sharpening) is kept only where T fitted on
  part of the validation split lowers the NLL of the rest (5-fold). With a handful of
  mistakes the NLL-optimal T is set by them alone: on sample_data's 179 validation images
  with almost none, T = 0.507 sharpened every answer and raised the test NLL from 0.0256
  to 0.0362. Softening needs no such check: its cost on an unseen mistake is bounded (the
  NLL tends to log C as T grows), sharpening's is not (a confident mistake's NLL grows
  without bound as T falls); checking both rejected the letters' T = 1.126 and
  sample_data's 1.080, which bring the test ECE closer to its floor (bench/calibration_bench.py).
- `expected_calibration_error`: Guo's ECE, 15 equal-width confidence bins (m-1)/M < c <= m/M,
  sum over bins of |B|/n * |accuracy(B) - confidence(B)|.
- `ece_noise_floor`: the ECE a perfectly calibrated model with the same confidences shows
  on a split of that size (each answer drawn right with the probability of its confidence).
- `risk_coverage` and `lowest_threshold`: the accuracy of the images answered against the
  share answered as the threshold rises; the lowest threshold reaching a target accuracy,
  "reaching" meaning that the one-sided 95 % Wilson lower bound of the answered images'
  accuracy is at the target. The plain point estimate picked the lucky dip of the curve:
  on the upper/lower-case letters, thresholds chosen for 0.95 and 0.99 gave 0.912 and 0.975
  on the test split, on the letters 0.99 gave 0.988; with the bound, the letters' 0.99 gave
  0.998 (bench/calibration_bench.py). The bound also says when a validation split is too
  small to show a target: 100 % of n answered right shows n / (n + 2.7), so 0.99 needs 268.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15
TARGET_ACCURACIES = (0.95, 0.99)  # train records the lowest validation threshold reaching each
MIN_PROBABILITY = 1e-12  # probabilities are clipped here before their log: a 0 from float32 has no log
TEMPERATURE_RANGE = (0.05, 20.0)
CURVE_POINTS = 101  # risk-coverage points kept in calibration.json and metrics.json
CHECK_FOLDS = 5  # a T below 1 is kept when fits on 4/5 of validation lower the NLL of the other 1/5
WILSON_Z = 1.645  # one-sided 95 %: the answered images' accuracy is at the target with this confidence


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T), row by row; T = 1 gives p back (renormalised)."""
    p = np.asarray(probabilities, dtype=np.float64)
    if temperature == 1.0:
        return p
    logits = np.log(np.clip(p, MIN_PROBABILITY, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def negative_log_likelihood(probabilities: np.ndarray, y: np.ndarray) -> float:
    """Mean -log p(true class), p clipped at MIN_PROBABILITY."""
    p = np.asarray(probabilities, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    picked = p[np.arange(len(p)), np.asarray(y, dtype=np.int64)]
    return float(-np.mean(np.log(np.clip(picked, MIN_PROBABILITY, 1.0))))


def _log_views(probabilities: np.ndarray) -> np.ndarray:
    """log p as (views, N, classes): one view, or the several that --tta averages."""
    p = np.asarray(probabilities, dtype=np.float64)
    return np.log(np.clip(p if p.ndim == 3 else p[None], MIN_PROBABILITY, 1.0))


def _tempered_nll(log_p: np.ndarray, y: np.ndarray, log_t: float) -> float:
    """NLL of the mean over views of softmax(log p / T)."""
    z = log_p / np.exp(log_t)
    e = np.exp(z - z.max(axis=2, keepdims=True))
    mean = (e / e.sum(axis=2, keepdims=True)).mean(axis=0)
    return float(-np.mean(np.log(np.clip(mean[np.arange(len(y)), y], MIN_PROBABILITY, 1.0))))


def fit_temperature(probabilities: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the NLL on (probabilities, y): a golden-section search on
    log T over TEMPERATURE_RANGE (the NLL of one temperature is convex in 1/T; numpy alone,
    where scipy's import would cost train a quarter of a second). `probabilities` may hold
    several views of each image, (views, N, classes), as --tta averages them: each view is
    tempered, then their mean is scored."""
    return _fit_on_logs(_log_views(probabilities), np.asarray(y, dtype=np.int64))


def _fit_on_logs(log_p: np.ndarray, y: np.ndarray) -> float:
    if len(y) == 0 or (log_p.mean(axis=0).argmax(axis=1) == y).all():
        return 1.0  # no mistake to learn from: the NLL only falls as T -> 0, which would sharpen every answer

    def nll(log_t: float) -> float:
        return _tempered_nll(log_p, y, log_t)

    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    ratio = (np.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    nll_a, nll_b = nll(a), nll(b)
    while high - low > 1e-6:
        if nll_a < nll_b:
            high, b, nll_b = b, a, nll_a
            a = high - ratio * (high - low)
            nll_a = nll(a)
        else:
            low, a, nll_a = a, b, nll_b
            b = low + ratio * (high - low)
            nll_b = nll(b)
    best = (low + high) / 2
    best = best if nll(best) < nll(0.0) else 0.0  # never worse than no temperature
    return round(float(np.exp(best)), 5)


def checked_temperature(probabilities: np.ndarray, y: np.ndarray, folds: int = CHECK_FOLDS) -> tuple[float, dict]:
    """The temperature fitted on all of (probabilities, y). One below 1 is kept only if it
    generalises within them: T fitted on all folds but one, scored on that one, must give
    a lower total NLL than no temperature; otherwise 1.0. Returns (T, the check's figures)."""
    log_p, y = _log_views(probabilities), np.asarray(y, dtype=np.int64)
    fold_of = np.arange(len(y)) % folds  # interleaved: the split is in class order, so each fold holds every class
    held_out_nll, untempered_nll = 0.0, 0.0
    for k in range(folds):
        held, fit = fold_of == k, fold_of != k
        if not held.any():
            continue
        t = _fit_on_logs(log_p[:, fit], y[fit])
        held_out_nll += _tempered_nll(log_p[:, held], y[held], np.log(t)) * held.sum()
        untempered_nll += _tempered_nll(log_p[:, held], y[held], 0.0) * held.sum()
    n = max(len(y), 1)
    check = {
        "folds": folds,
        "mistakes": int((log_p.mean(axis=0).argmax(axis=1) != y).sum()),
        "held_out_nll": round(float(held_out_nll) / n, 6),
        "held_out_nll_without": round(float(untempered_nll) / n, 6),
    }
    temperature = _fit_on_logs(log_p, y)
    check["kept"] = bool(temperature >= 1.0 or held_out_nll < untempered_nll)
    return (temperature if check["kept"] else 1.0), check


def _bin_of(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Bin m (0-based) holds m/bins < c <= (m+1)/bins; a confidence of 0 goes to the first."""
    return np.clip(np.ceil(np.asarray(confidence) * bins).astype(np.int64) - 1, 0, bins - 1)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width bin: its range, count, mean confidence and accuracy (None when empty)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    which = _bin_of(confidence, bins)
    counts = np.bincount(which, minlength=bins)
    confidence_sum = np.bincount(which, weights=confidence, minlength=bins)
    correct_sum = np.bincount(which, weights=correct, minlength=bins)
    return [
        {
            "low": m / bins,
            "high": (m + 1) / bins,
            "count": int(counts[m]),
            "confidence": float(confidence_sum[m] / counts[m]) if counts[m] else None,
            "accuracy": float(correct_sum[m] / counts[m]) if counts[m] else None,
        }
        for m in range(bins)
    ]


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Guo's ECE: sum over equal-width bins of |B|/n * |accuracy(B) - mean confidence(B)|."""
    confidence = np.asarray(confidence, dtype=np.float64)
    if len(confidence) == 0:
        return float("nan")
    filled = [b for b in reliability_bins(confidence, correct, bins) if b["count"]]
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in filled) / len(confidence))


def ece_noise_floor(confidence: np.ndarray, draws: int = 200, seed: int = 0) -> dict:
    """The ECE of a perfectly calibrated model with these confidences on a split of this size:
    each answer drawn right with the probability of its confidence, `draws` times."""
    confidence = np.asarray(confidence, dtype=np.float64)
    rng = np.random.default_rng(seed)
    eces = np.array(
        [expected_calibration_error(confidence, rng.random(len(confidence)) < confidence) for _ in range(draws)]
    )
    p5, p50, p95 = np.percentile(eces, [5, 50, 95])
    return {"mean": float(eces.mean()), "p5": float(p5), "median": float(p50), "p95": float(p95), "draws": draws}


def risk_coverage(confidence: np.ndarray, correct: np.ndarray, points: int = CURVE_POINTS) -> list[dict]:
    """As the threshold rises: threshold, share answered (confidence >= threshold) and their
    accuracy; at most `points` points, from all answered down to the most confident few."""
    full = _curve(confidence, correct)
    if len(full["threshold"]) == 0:
        return []
    keep = np.unique(np.linspace(0, len(full["threshold"]) - 1, min(points, len(full["threshold"]))).round())
    return [
        {
            "threshold": float(full["threshold"][i]),
            "coverage": float(full["coverage"][i]),
            "accuracy": float(full["accuracy"][i]),
            "answered": int(full["answered"][i]),
        }
        for i in keep.astype(np.int64)[::-1]
    ]


def _curve(confidence: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Every distinct threshold (each distinct confidence), most confident first: with ties
    answered together, as `confidence >= threshold` answers them."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence, right = confidence[order], np.cumsum(correct[order])
    # the last position of each group of equal confidences
    ends = np.flatnonzero(np.append(sorted_confidence[1:] != sorted_confidence[:-1], True))
    answered = ends + 1
    return {
        "threshold": sorted_confidence[ends],
        "coverage": answered / max(len(confidence), 1),
        "accuracy": right[ends] / answered,
        "answered": answered,
    }


def wilson_lower_bound(accuracy, answered, z: float = WILSON_Z):
    """The one-sided Wilson score lower bound of an accuracy measured on `answered` images."""
    p, n = np.asarray(accuracy, dtype=np.float64), np.maximum(np.asarray(answered, dtype=np.float64), 1)
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(np.maximum(p * (1 - p) / n + z * z / (4 * n * n), 0))
    return (centre - spread) / (1 + z * z / n)


def lowest_threshold(confidence: np.ndarray, correct: np.ndarray, target: float, z: float = WILSON_Z) -> dict | None:
    """The lowest threshold whose answered images (confidence >= it) are `target` accurate by
    the Wilson lower bound at `z` (0: the plain accuracy), with the share answered and their
    accuracy; None when no threshold reaches it."""
    curve = _curve(confidence, correct)
    reaching = np.flatnonzero(wilson_lower_bound(curve["accuracy"], curve["answered"], z) >= target - 1e-12)
    if len(reaching) == 0:
        return None
    i = reaching[-1]  # the largest answered set is the lowest threshold
    return {
        "threshold": float(curve["threshold"][i]),
        "coverage": float(curve["coverage"][i]),
        "accuracy": float(curve["accuracy"][i]),
        "answered": int(curve["answered"][i]),
    }


def calibration_summary(probabilities: np.ndarray, y: np.ndarray) -> dict:
    """ECE, NLL, accuracy and mean confidence of one set of probabilities."""
    p = np.asarray(probabilities, dtype=np.float64)
    confidence, correct = p.max(axis=1), p.argmax(axis=1) == np.asarray(y)
    return {
        "ece": expected_calibration_error(confidence, correct),
        "nll": negative_log_likelihood(p, y),
        "accuracy": float(np.mean(correct)),
        "mean_confidence": float(np.mean(confidence)),
    }


def calibrate_on_validation(
    probabilities: np.ndarray, y: np.ndarray, mirrored: np.ndarray | None = None, targets=TARGET_ACCURACIES
) -> dict:
    """What train records: the temperature fitted on the validation probabilities, the
    validation ECE and NLL before and after, and the lowest calibrated threshold reaching
    each target accuracy (None where none does). With the probabilities of the mirror
    images, also `tta_temperature`, for --tta's mean of the two (a mean of two softmaxes is
    less sure than either, so it needs a temperature of its own)."""
    temperature, check = checked_temperature(probabilities, y)
    calibrated = apply_temperature(probabilities, temperature)
    confidence, correct = calibrated.max(axis=1), calibrated.argmax(axis=1) == np.asarray(y)
    return {
        "temperature": temperature,
        "fitted_on": "validation",
        "n_val": int(len(y)),
        "temperature_check": check,
        "before": calibration_summary(probabilities, y),
        "after": calibration_summary(calibrated, y),
        "thresholds": {f"{t:g}": lowest_threshold(confidence, correct, t) for t in targets},
        "risk_coverage": risk_coverage(confidence, correct),
        "tta_temperature": None if mirrored is None else checked_temperature(np.stack([probabilities, mirrored]), y)[0],
    }


def threshold_for(calibration: dict | None, target: float) -> dict | None:
    """The recorded threshold for `target`, or, for another target, the lowest threshold of
    the recorded validation curve reaching it; None when the validation split never reached it."""
    calibration = calibration or {}
    recorded = calibration.get("thresholds", {})
    if f"{target:g}" in recorded:
        return recorded[f"{target:g}"]
    reaching = [
        p
        for p in calibration.get("risk_coverage", [])
        if wilson_lower_bound(p["accuracy"], p.get("answered", 1e9)) >= target - 1e-12
    ]
    if not reaching:
        return None
    best = min(reaching, key=lambda p: p["threshold"])
    return {"threshold": best["threshold"], "coverage": best["coverage"], "accuracy": best["accuracy"]}


def evaluation_report(y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, calibration: dict | None) -> dict:
    """evaluate's calibration block: ECE and NLL before and after the temperature, the ECE's
    noise floor on this many test images, the reliability bins, the risk-coverage curve and
    one sentence on the recorded thresholds as they hold on the test split."""
    y = np.asarray(y)
    confidence, correct = calibrated.max(axis=1), calibrated.argmax(axis=1) == y
    floor = ece_noise_floor(confidence)
    after = calibration_summary(calibrated, y)
    return {
        "temperature": float(calibration["temperature"]) if calibration else None,
        "before": calibration_summary(raw, y),
        "after": after,
        "ece_noise_floor": floor,
        "within_noise_floor": bool(after["ece"] <= floor["p95"]),
        "reliability": reliability_bins(confidence, correct),
        "risk_coverage": risk_coverage(confidence, correct),
        "thresholds_on_test": _thresholds_on_test(confidence, correct, calibration),
        "advice": advice(confidence, correct, calibration),
    }


def _thresholds_on_test(confidence: np.ndarray, correct: np.ndarray, calibration: dict | None) -> dict:
    """Each recorded target's validation threshold, and the share answered and accuracy it gives on test."""
    found = {}
    for target, chosen in ((calibration or {}).get("thresholds") or {}).items():
        if chosen is None:
            found[target] = None
            continue
        answered = confidence >= chosen["threshold"]
        found[target] = {
            "threshold": chosen["threshold"],
            "coverage": float(np.mean(answered)),
            "accuracy": float(np.mean(correct[answered])) if answered.any() else None,
        }
    return found


def advice(confidence: np.ndarray, correct: np.ndarray, calibration: dict | None) -> str:
    """One sentence a person can act on: how many test images a threshold answers, and how many of those are right."""
    thresholds = (calibration or {}).get("thresholds") or {}
    target = next((t for t in ("0.99", "0.95") if thresholds.get(t)), None)
    cut = thresholds[target]["threshold"] if target else 0.9
    answered = confidence >= cut
    how = (
        f"With --target-accuracy {target} (confidence {cut:.3f} or more, chosen on the validation split)"
        if target
        else f"At confidence {cut:.2f} or more"
    )
    if not answered.any():
        return f"{how}: none of the {len(confidence)} test images is answered; every one would be 'unsure'."
    return (
        f"{how}: {np.mean(answered):.1%} of the {len(confidence)} test images are answered, and "
        f"{np.mean(correct[answered]):.1%} of those are right; the other {1 - np.mean(answered):.1%} are 'unsure'."
    )
