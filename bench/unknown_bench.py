"""Unknown bench (issue 36): does the novelty score tell pictures of none of the classes apart?

Each known folder is prepared and trained at the defaults (`pipeline prepare DIR`, `pipeline
train`), as a new user runs them; then `pipeline evaluate --foreign` measures its model against
the other folders: the first folder (the shared letters) against every other one and every
--foreign folder, and each other folder, the other way round, against the first. From
metrics.json's novelty block, per pair: the AUROC of the novelty and of the max-softmax baseline
(1 - the calibrated confidence), each with its standard error (Hanley-McNeil), OpenOOD's
FPR@95%TPR of each, and at the default threshold the share of foreign pictures accepted and of
test pictures refused (binomial standard errors).

Cost per image (--timing): on the first folder's model, medians of --repeats runs at batch 1
and 64, through LiteRT on one thread (as each of serve's workers runs it, numpy's BLAS on one
thread too): the inference model (probabilities and features from one call) against the same
network with one output (written for the comparison), and the novelty score itself (numpy,
the bank train wrote). Run the timing on a quiet machine.

    make bench-unknown     # the folders under bench/work/, then this
    python bench/unknown_bench.py LETTERS sample_data STAMPS FASHION --foreign EMOJI --work W
    python bench/unknown_bench.py LETTERS sample_data --timing --work W --epochs 1   # a small proof

Writes W/unknown_results.json and prints a Markdown table. Run from the repository root with the
project's Python (PYTHONPATH=. for a worktree).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pipeline(*args) -> None:
    subprocess.run([sys.executable, "-m", "pipeline", *map(str, args), "--quiet"], check=True, cwd=ROOT)


def trained(images: Path, work: Path, epochs: int | None) -> tuple[Path, Path]:
    """prepare and train at the defaults (only --epochs for a small proof); kept between runs."""
    data, model = work / "data", work / "model"
    if not (data / "report.json").is_file():
        pipeline("prepare", images, "--out", data)
    if not (model / "novelty.json").is_file():
        pipeline("train", "--data", data, "--out", model, *(["--epochs", epochs] if epochs else []))
    return data, model


def measured(data: Path, model: Path, foreign: Path, work: Path) -> dict:
    out = work / f"reports-{foreign.name}"
    pipeline("evaluate", "--data", data, "--model", model, "--out", out, "--foreign", foreign)
    novelty = json.loads((out / "metrics.json").read_text())["novelty"]
    found, baseline = novelty["foreign"], novelty["foreign"]["baseline"]
    return {
        "foreign": foreign.name,
        "n_test": found["n_known"],
        "n_foreign": found["n_foreign"],
        "threshold": novelty["threshold"],
        "auroc": found["auroc"],
        "auroc_se": found["auroc_se"],
        "msp_auroc": baseline["auroc"],
        "msp_auroc_se": baseline["auroc_se"],
        "fpr95": found["fpr_at_95_tpr"],
        "msp_fpr95": baseline["fpr_at_95_tpr"],
        "foreign_accepted": found["foreign_accepted"],
        "foreign_accepted_se": found["foreign_accepted_se"],
        "test_refused": found["known_refused"],
        "test_refused_se": found["known_refused_se"],
    }


def median_seconds(call, repeats: int) -> float:
    call()  # allocation and tracing are not the cost
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def cost_per_image(data: Path, model: Path, repeats: int) -> dict:
    """Seconds per image: the two-output LiteRT call, the one-output one, and the novelty score."""
    from threadpoolctl import threadpool_limits

    from pipeline.inference.classifier import load_classifier
    from pipeline.inference.engines import litert_runner
    from pipeline.inference.model_folder import load_keras_model

    threadpool_limits(1, user_api="blas")  # as serve runs it: one thread a worker, numpy's BLAS too
    classifier = load_classifier(model, "litert", threads=1)
    X = np.load(data / "X_test.npy")
    with tempfile.TemporaryDirectory() as tmp:
        single = Path(tmp) / "single.tflite"
        load_keras_model(model).export(str(single), format="litert", verbose=False)
        one_output = litert_runner(single, X.shape[1:], len(classifier.classes), 1)
        found = {}
        for batch in (1, 64):
            rows = np.resize(X, (max(batch, len(X)), *X.shape[1:]))[:batch]
            features = classifier.run(rows)[1]
            found[f"batch_{batch}"] = {
                "with_features_s": median_seconds(lambda rows=rows: classifier.run(rows), repeats) / batch,
                "probabilities_only_s": median_seconds(lambda rows=rows: one_output(rows), repeats) / batch,
                "novelty_score_s": median_seconds(lambda f=features: classifier.novelty.scores(f), repeats)
                / batch,  # fmt: skip
            }
    found["bank_images"] = int(len(classifier.novelty.bank))
    found["dimensions"] = classifier.novelty.dimensions
    return found


def table(results: list[dict]) -> str:
    lines = [
        "| model trained on | foreign | AUROC novelty | AUROC max softmax | FPR@95 novelty | FPR@95 max softmax "
        "| foreign accepted at the threshold | test refused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['known']} ({r['n_test']} test) | {r['foreign']} ({r['n_foreign']}) "
            f"| {r['auroc']:.4f} ± {r['auroc_se']:.4f} | {r['msp_auroc']:.4f} ± {r['msp_auroc_se']:.4f} "
            f"| {r['fpr95']:.1%} | {r['msp_fpr95']:.1%} "
            f"| {r['foreign_accepted']:.1%} ± {r['foreign_accepted_se']:.1%} "
            f"| {r['test_refused']:.1%} ± {r['test_refused_se']:.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="class folders: the first against every other")
    parser.add_argument("--foreign", type=Path, nargs="*", default=[], help="foreign-only folders for the first")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "unknown")
    parser.add_argument("--epochs", type=int, default=None, help="only for a small proof: the default is train's")
    parser.add_argument("--one-way", action="store_true", help="the first folder's model only")
    parser.add_argument("--timing", action="store_true", help="cost per image (run on a quiet machine)")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    first, others = args.folders[0], args.folders[1:]
    results = []
    models = {}
    for known in [first] if args.one_way else args.folders:
        work = args.work / known.name
        models[known] = trained(known.resolve(), work, args.epochs)
        against = [*others, *args.foreign] if known == first else [first]
        for foreign in against:
            results.append({"known": known.name, **measured(*models[known], foreign.resolve(), work)})
            print(json.dumps(results[-1]), flush=True)
    report = {"results": results}
    if args.timing:
        report["cost_per_image"] = cost_per_image(*models[first], args.repeats)
        print(json.dumps(report["cost_per_image"], indent=2))
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "unknown_results.json").write_text(json.dumps(report, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
