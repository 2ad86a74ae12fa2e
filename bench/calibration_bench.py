"""Calibration bench (issue 22): what the temperature, "unsure" and TTA do on real folders.

For each class folder: `pipeline prepare` and `pipeline train` at the defaults (as a new
user runs them), then `evaluate` and `evaluate --tta`. Reads the model folder's
calibration.json and settings.json and evaluate's metrics.json; prints one JSON object
per folder and a table, and writes them to --out (default bench/calibration_results.json).

Per folder: test accuracy before and after the temperature (must be equal: no prediction
changes), ECE and NLL before and after, beside each ECE the noise floor of a perfectly
calibrated model with the same confidences on a test split of that size (mean, 5th-95th
percentile of 200 draws), mean confidence against accuracy, the temperature, the seconds
calibration adds to train (the validation pass and the fit, as train measured them), and
TTA's accuracy, ECE and seconds against evaluate without it.

    python bench/calibration_bench.py sample_data                 # a minute or two
    python /work/shared/bench/make_letters_folder.py /tmp/letters
    python /work/shared/bench/make_letters_folder.py /tmp/cases --letters CcKkOoPpSsUuVvWwXxZz
    python bench/calibration_bench.py sample_data /tmp/letters /tmp/cases --work /tmp/calbench

Run from the repository root with the project's Python (PYTHONPATH=. for a worktree).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GOAL_ECE = 0.015
GOAL_GAP = 0.01  # mean confidence within a point of accuracy


def gap_floor(predictions_csv: Path, draws: int = 2000, seed: int = 0) -> list[float]:
    """The 5th-95th percentile of |mean confidence - accuracy| that a perfectly calibrated
    model with these confidences shows on this many test images (each answer drawn right
    with the probability of its confidence): the gap's noise, as ece_noise_floor is ECE's."""
    import csv

    import numpy as np

    with open(predictions_csv, newline="") as f:
        confidence = np.array([float(row["confidence"]) for row in csv.DictReader(f)])
    rng = np.random.default_rng(seed)
    gaps = np.abs(confidence.mean() - (rng.random((draws, len(confidence))) < confidence).mean(axis=1))
    return [float(np.percentile(gaps, 5)), float(np.percentile(gaps, 95))]


def run(*args) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", *map(str, args), "--quiet"], check=True)
    return time.perf_counter() - started


def bench_folder(images: Path, work: Path, prepare_options: list[str]) -> dict:
    data, model = work / "data", work / "model"
    run("prepare", images, "--out", data, *prepare_options)
    train_seconds = run("train", "--data", data, "--out", model)
    evaluate_seconds = run("evaluate", "--data", data, "--model", model, "--out", work / "reports")
    tta_seconds = run("evaluate", "--data", data, "--model", model, "--out", work / "reports_tta", "--tta")
    settings = json.loads((model / "settings.json").read_text())
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    tta = json.loads((work / "reports_tta" / "metrics.json").read_text())
    block, tta_block = metrics["calibration"], tta["calibration"]
    floor = block["ece_noise_floor"]
    return {
        "folder": str(images),
        "n_test": metrics["n_test"],
        "temperature": block["temperature"],
        "accuracy_before": block["before"]["accuracy"],
        "accuracy_after": block["after"]["accuracy"],
        "predictions_unchanged": block["before"]["accuracy"] == block["after"]["accuracy"],
        "ece_before": block["before"]["ece"],
        "ece_after": block["after"]["ece"],
        "ece_floor_mean": floor["mean"],
        "ece_floor_p5_p95": [floor["p5"], floor["p95"]],
        "within_floor": block["within_noise_floor"],
        "goal_met": block["after"]["ece"] <= GOAL_ECE or block["within_noise_floor"],
        "nll_before": block["before"]["nll"],
        "nll_after": block["after"]["nll"],
        "mean_confidence_before": block["before"]["mean_confidence"],
        "mean_confidence_after": block["after"]["mean_confidence"],
        "gap_after": abs(block["after"]["mean_confidence"] - block["after"]["accuracy"]),
        "gap_floor_p5_p95": (gap := gap_floor(work / "reports" / "predictions.csv")),
        "gap_goal_met": abs(block["after"]["mean_confidence"] - block["after"]["accuracy"]) <= max(GOAL_GAP, gap[1]),
        "val": settings.get("calibration"),
        "calibration_seconds_in_train": (settings.get("calibration") or {}).get("seconds"),
        "train_seconds": round(train_seconds, 1),
        "advice": block["advice"],
        "thresholds_on_test": block["thresholds_on_test"],
        "tta": tta["tta"],
        "tta_accuracy": tta["accuracy"],
        "tta_ece": tta_block["after"]["ece"],
        "tta_nll": tta_block["after"]["nll"],
        "evaluate_seconds": round(evaluate_seconds, 1),
        "evaluate_tta_seconds": round(tta_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/calibration_bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/calibration_results.json"))
    parser.add_argument("--prepare", default="", help="extra prepare options, e.g. '--no-flip'")
    args = parser.parse_args()
    results = []
    for i, folder in enumerate(args.folders):
        found = bench_folder(folder, args.work / f"{i}_{folder.name}", args.prepare.split())
        print(json.dumps(found), flush=True)
        results.append(found)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'folder':24} {'acc':>6} {'T':>6} {'ECE before':>10} {'ECE after':>10} {'floor 5-95%':>13} "
          f"{'conf':>6} {'gap (floor 95%)':>15} {'NLL before':>10} {'after':>7} {'cal s':>6} {'TTA acc':>8} {'TTA ECE':>8} {'TTA s':>6}")  # fmt: skip
    for r in results:
        low, high = r["ece_floor_p5_p95"]
        gap = f"{r['gap_after']:.2%} ({r['gap_floor_p5_p95'][1]:.2%})"
        print(
            f"{Path(r['folder']).name:24} {r['accuracy_after']:6.2%} {r['temperature'] or 1:6.3f} "
            f"{r['ece_before']:10.2%} {r['ece_after']:10.2%} {f'{low:.1%}-{high:.1%}':>13} "
            f"{r['mean_confidence_after']:6.2%} {gap:>15} "
            f"{r['nll_before']:10.4f} {r['nll_after']:7.4f} "
            f"{r['calibration_seconds_in_train'] or 0:6.2f} {r['tta_accuracy']:8.2%} {r['tta_ece']:8.2%} "
            f"{r['evaluate_tta_seconds']:5.1f}/{r['evaluate_seconds']:.1f}"
        )


if __name__ == "__main__":
    main()
