"""The CNN against train --backbone on folders of real photos: accuracy, wall time, features/s, memory.

For each folder and each split seed, each step a whole `pipeline` process (timed, its peak
resident memory read from wait4's rusage):

  CNN:       prepare (defaults: 32 px) --seed S; train (defaults); evaluate
  backbone:  prepare --size SIZE --seed S; train --backbone B (its defaults); evaluate;
             train --backbone B again (the features come from the cache: the re-run's cost)

The folders are the shared real photos (../shared/bench/make_real_folder.py): `stamps`
(189 photos, 7 classes; its test split is ~37 images, so compare over several seeds) and
`fashion` (Fashion-MNIST's 28 px grey product photos, --fashion-per-class a class: a case
where the CNN may win). Features per second are the backbone's rows computed over the
seconds it took (settings.json), set against the machine's limit: the network's
multiply-adds per image (counted from its layers) times that rate, over the float32
multiply-adds per second this machine's numpy matmul reaches on both cores.

    python bench/backbone_bench.py                             # stamps and fashion, seeds 1-3
    python bench/backbone_bench.py --folders stamps --seeds 1  # a quick check

Prints one JSON document and writes it to bench/work/backbone/results.json; the accuracy
lines are also printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.core.settings import BACKBONE_SIZES

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "bench"


def timed(*args) -> dict:
    """One pipeline command as its own process: {"seconds", "peak_mb" (ru_maxrss of that child, by wait4), "stdout"}."""
    command = [sys.executable, "-m", "pipeline", *map(str, args)]
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: nothing blocks while stdout is read
        process = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr,
            env={**os.environ, "PIPELINE_PROGRESS": "never"},
        )  # fmt: skip
        out = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory
        stderr.seek(0)
        err = stderr.read()
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(command)}\n{out[-2000:].decode()}\n{err[-2000:].decode()}")
    return {"seconds": round(seconds, 1), "peak_mb": round(usage.ru_maxrss / 1024), "stdout": out.decode()}


def folder(which: str, work: Path, per_class: int) -> Path:
    target = work / (which if which == "stamps" else f"fashion{per_class}")
    if not target.is_dir():
        extra = ["--per-class", str(per_class)] if which == "fashion" else []
        subprocess.run(
            [sys.executable, str(SHARED / "make_real_folder.py"), which, str(target), *extra,
             "--cache", str(work / ".deb-cache")],
            check=True,
        )  # fmt: skip
    return target


def accuracy(data: Path, model: Path, reports: Path) -> float:
    return json.loads(timed("evaluate", "--data", data, "--model", model, "--out", reports, "--json")["stdout"])[
        "accuracy"
    ]


def one_seed(images: Path, work: Path, seed: int, backbone: str, epochs: int | None) -> dict:
    run = work / f"seed{seed}"
    cnn_data, bb_data = run / "cnn" / "data", run / "bb" / "data"
    extra = ["--epochs", str(epochs)] if epochs else []
    timed("prepare", images, "--out", cnn_data, "--seed", seed, "--quiet")
    cnn = timed("train", "--data", cnn_data, "--out", run / "cnn" / "model", *extra, "--quiet")
    size = BACKBONE_SIZES[backbone]
    # a fresh cache: the first train computes every feature, as a new user's would
    cache = run / "bb" / "cache"
    timed("prepare", images, "--out", bb_data, "--seed", seed, "--size", size, "--cache", cache, "--quiet")
    first = timed("train", "--data", bb_data, "--out", run / "bb" / "model", "--backbone", backbone, *extra, "--quiet")
    again = timed("train", "--data", bb_data, "--out", run / "bb" / "again", "--backbone", backbone, *extra, "--quiet")
    summary = json.loads((run / "bb" / "model" / "settings.json").read_text())["summary"]
    rows = int(
        np.load(bb_data / "X_train.npy", mmap_mode="r").shape[0]
        + np.load(bb_data / "X_val.npy", mmap_mode="r").shape[0]
    )
    features_s = summary["backbone"]["seconds"]["features"]
    return {
        "seed": seed,
        "cnn": {"accuracy": accuracy(cnn_data, run / "cnn" / "model", run / "cnn" / "reports"), **_cost(cnn)},
        "backbone": {
            "accuracy": accuracy(bb_data, run / "bb" / "model", run / "bb" / "reports"),
            **_cost(first),
            "rerun_seconds": again["seconds"],
            "features_seconds": features_s,
            "feature_rows": rows,
            "features_per_s": round(rows / features_s, 1) if features_s else None,
            "fit_seconds": summary["seconds"],
            "epochs_run": summary["epochs_run"],
        },
    }


def _cost(result: dict) -> dict:
    return {"train_seconds": result["seconds"], "train_peak_mb": result["peak_mb"]}


def multiply_adds(backbone: str, size: int) -> int:
    """The backbone's multiply-adds for one image, counted from its convolutions."""
    from pipeline.training.backbone import build_network

    network = build_network(backbone, (size, size, 3), 2, pretrained=True)
    total = 0
    for layer in network.model.layers:
        kind = type(layer).__name__
        if kind in ("Conv2D", "DepthwiseConv2D"):
            h, w, c_out = layer.output.shape[1:]
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            total += h * w * kh * kw * (c_in * c_out if kind == "Conv2D" else c_out)
        elif kind == "Dense":
            total += layer.kernel.shape[0] * layer.kernel.shape[1]
    return int(total)


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """float32 multiply-adds per second of numpy's matmul on this machine (the best of `repeats`)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - started)
    return n**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folders", nargs="+", default=["stamps", "fashion"], choices=["stamps", "fashion"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--backbone", default="efficientnet-lite0", choices=list(BACKBONE_SIZES))
    parser.add_argument("--fashion-per-class", type=int, default=150)
    parser.add_argument("--epochs", type=int, help="both networks' budget (default: train's own)")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "work" / "backbone")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"backbone": args.backbone, "folders": {}, "load_before": os.getloadavg()[0]}
    for which in args.folders:
        images = folder(which, args.work, args.fashion_per_class)
        runs = [one_seed(images, args.work / "runs" / images.name, s, args.backbone, args.epochs) for s in args.seeds]
        results["folders"][which] = {"images": str(images), "runs": runs, "summary": _summary(runs)}
    size = BACKBONE_SIZES[args.backbone]
    macs, rate = multiply_adds(args.backbone, size), matmul_rate()
    rates = [r["backbone"]["features_per_s"] for f in results["folders"].values() for r in f["runs"]]
    results["features"] = {
        "multiply_adds_per_image": macs,
        "matmul_multiply_adds_per_s": round(rate),
        "machine_limit_images_per_s": round(rate / macs, 1),
        "measured_images_per_s": statistics.median(r for r in rates if r) if any(rates) else None,
    }
    results["load_after"] = os.getloadavg()[0]
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(
        "\n| folder | seed | CNN accuracy | CNN train s | backbone accuracy | backbone train s | re-run s | peak MB (CNN / backbone) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for which, found in results["folders"].items():
        for r in found["runs"]:
            c, b = r["cnn"], r["backbone"]
            print(
                f"| {which} | {r['seed']} | {c['accuracy']:.3f} | {c['train_seconds']} | {b['accuracy']:.3f} | "
                f"{b['train_seconds']} | {b['rerun_seconds']} | {c['train_peak_mb']} / {b['train_peak_mb']} |"
            )


def _summary(runs: list[dict]) -> dict:
    def spread(values):
        return {
            "median": round(statistics.median(values), 4),
            "min": round(min(values), 4),
            "max": round(max(values), 4),
        }

    return {
        "cnn_accuracy": spread([r["cnn"]["accuracy"] for r in runs]),
        "backbone_accuracy": spread([r["backbone"]["accuracy"] for r in runs]),
        "cnn_train_seconds": spread([r["cnn"]["train_seconds"] for r in runs]),
        "backbone_train_seconds": spread([r["backbone"]["train_seconds"] for r in runs]),
        "backbone_rerun_seconds": spread([r["backbone"]["rerun_seconds"] for r in runs]),
    }


if __name__ == "__main__":
    main()
