"""`pipeline export` per format: file size, test accuracy, top-1 agreement with Keras, latency.

For each data set (sample_data's digits, and the letters of ../shared/bench/make_letters_folder.py),
prepares and trains with pipeline's defaults into bench/work/export/<name>/ (gitignored;
skipped when already there), exports every format with `pipeline export`, and reads the
tool's own check from exports.json (size, accuracy, agreement, largest probability
difference on the test split). Then times each engine through `load_classifier(engine)`,
as predict, evaluate and serve run it: the median seconds per image at batch 1 (200 calls)
and at batch 64 (30 calls), after a warm-up, single process, all cores. Keras and the float
LiteRT file train writes are the baselines. Prints a Markdown table and writes it to
bench/work/export/RESULTS.md.

Goals (issue 24): int8 at most 30 % of the float size, its accuracy within 0.5 point of
Keras', agreement at least 99 %; ONNX and OpenVINO agreement 100 %.

    python bench/export_bench.py                   # sample_data and the letters
    python bench/export_bench.py --only sample_data --no-latency   # the timing-free figures
    python bench/export_bench.py --letters-dir DIR # letters already made elsewhere

Latencies are only meaningful on a quiet machine. Benchmarks are not tests: CI does not run this.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "export"
SHARED = ROOT / ".." / "shared" / "bench"
sys.path.insert(0, str(ROOT))

from pipeline.core import paths  # noqa: E402
from pipeline.core.settings import EXPORT_FORMATS  # noqa: E402


def pipeline(*args) -> None:
    subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], check=True, cwd=ROOT)


def letters_folder(given: Path | None, shared: Path) -> Path:
    if given:
        return given
    folder = WORK / "letters_images"
    if not (folder / "J").is_dir():
        subprocess.run([sys.executable, str(shared / "make_letters_folder.py"), str(folder)], check=True)
    return folder


def trained(name: str, images: Path) -> tuple[Path, Path]:
    """prepare (--no-flip: digits and letters mirrored are other symbols) and train, once."""
    data, model = WORK / name / "data", WORK / name / "model"
    if not (data / paths.PREPARE_REPORT_FILE).is_file():
        pipeline("prepare", images, "--out", data, "--no-flip", "--quiet")
    if not (model / paths.TRAIN_SETTINGS_FILE).is_file():
        pipeline("train", "--data", data, "--out", model, "--quiet")
    return data, model


def latency(model: Path, engine: str, X: np.ndarray) -> tuple[float, float]:
    """Median seconds per image at batch 1 and at batch 64, through the engine predict runs."""
    from pipeline.inference.classifier import load_classifier

    run = load_classifier(model, engine).run
    results = []
    for batch, calls in ((1, 200), (64, 30)):
        rows = np.resize(X, (max(batch, len(X)), *X.shape[1:]))  # repeat a small test split
        run(rows[:batch])  # allocation and graph tracing are not latency
        times = []
        for i in range(calls):
            start = (i * batch) % (len(rows) - batch + 1)
            began = time.perf_counter()
            run(rows[start : start + batch])
            times.append(time.perf_counter() - began)
        results.append(statistics.median(times) / batch)
    return results[0], results[1]


def float_litert(model: Path, data: Path) -> dict:
    """train's float model.tflite, measured the way export checks the others."""
    from pipeline.export import compare
    from pipeline.inference.classifier import load_classifier

    X, y = np.load(data / "X_test.npy"), np.load(data / "y_test.npy")
    found = compare(load_classifier(model, "litert").run(X)[0], load_classifier(model, "keras").run(X)[0], y)
    return {k: found[k] for k in ("accuracy", "agreement", "max_difference")}


def bench(name: str, images: Path, timed: bool) -> list[dict]:
    data, model = trained(name, images)
    for fmt in EXPORT_FORMATS:
        pipeline("export", "--model", model, "--data", data, "--format", fmt, "--quiet")
    records = json.loads((model / paths.EXPORTS_FILE).read_text())
    X = np.load(data / "X_test.npy")
    keras_accuracy = records[EXPORT_FORMATS[0]]["keras_accuracy"]
    rows = [
        {"format": "keras", "bytes": (model / paths.MODEL_FILE).stat().st_size, "accuracy": keras_accuracy},
        {"format": "litert", "bytes": (model / paths.TFLITE_FILE).stat().st_size, **float_litert(model, data)},
    ]
    rows += [{"format": fmt, **records[fmt]} for fmt in EXPORT_FORMATS]
    float_size = rows[1]["bytes"]
    for row in rows:
        row["data"], row["n_test"] = name, len(X)
        row["size_ratio"] = row["bytes"] / float_size
        if timed:
            row["batch1_ms"], row["batch64_ms"] = (1000 * t for t in latency(model, row["format"], X))
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| data | format | size MB | / float tflite | test accuracy | agreement with Keras | largest prob. diff "
        "| ms/image batch 1 | ms/image batch 64 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cell(row, key, spec):
        return format(row[key], spec) if key in row else ""

    for r in rows:
        lines.append(
            f"| {r['data']} ({r['n_test']} test) | {r['format']} | {r['bytes'] / 1e6:.2f} | {r['size_ratio']:.1%} "
            f"| {cell(r, 'accuracy', '.4f')} | {cell(r, 'agreement', '.2%')} | {cell(r, 'max_difference', '.3g')} "
            f"| {cell(r, 'batch1_ms', '.3f')} | {cell(r, 'batch64_ms', '.3f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=["sample_data", "letters"], default=["sample_data", "letters"])
    parser.add_argument("--letters-dir", type=Path, help="letters made by make_letters_folder.py already")
    parser.add_argument("--shared", type=Path, default=SHARED, help="the folder of make_letters_folder.py")
    parser.add_argument("--no-latency", action="store_true", help="sizes, accuracy and agreement only")
    args = parser.parse_args()
    rows = []
    for name in args.only:
        images = ROOT / "sample_data" if name == "sample_data" else letters_folder(args.letters_dir, args.shared)
        rows += bench(name, images, not args.no_latency)
    text = table(rows)
    print(text)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "RESULTS.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
