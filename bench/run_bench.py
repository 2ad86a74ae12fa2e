"""`make bench`: pipeline against the naive reference scripts in ../shared/bench, side by side.

Builds real-photo JPEG folders with ../shared/bench/make_photo_folder.py into bench/work/
(gitignored), then runs each pair of commands in turn (A B A B ..., a few repeats) as whole
processes and prints a table of median ratios: prepare (images/s, wall, peak memory),
prepare's memory on a large folder, train (training images/s and test accuracy on the
same arrays: the photos for speed, sample_data's digits for accuracy, since the photo
classes mean nothing), train on the letters folder (make_letters_folder.py: A-J in some 200
typefaces, where accuracy moves): equal epochs (3 and 10) at batch 32 both and at
pipeline's defaults, and time to accuracy (`pipeline train` with no options against the
reference's 10 epochs), the phases of a short train (bench/train_phases.py) and predict
(one photo, cold process), serve (serve_load.py: a load test of `pipeline serve` on
loopback), prepare on a 2-worker Dask LocalCluster with the global step at scale, and one
TF_CONFIG worker against two (bench/allreduce.py for the all-reduce). Writes the tables to
bench/RESULTS.md.

    python bench/run_bench.py            # 2,000 photos at 64 px, 10,000 at 128 px for memory
    python bench/run_bench.py --quick    # 400 photos, 2,000 for memory, 1 repeat: for iterating
    python bench/run_bench.py --only letters phases --repeats 3   # just these sections
    python bench/run_bench.py --workers-only   # one worker against two (TF_CONFIG, loopback) only

Memory: "peak" is the largest single process (os.wait4 rusage, as /usr/bin/time -v reports
it); "tree" is the largest sum of PSS over the command and all its worker processes,
sampled every 20 ms from /proc. Benchmarks are not tests: CI does not run this.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dask_bench  # noqa: E402
import global_step  # noqa: E402
from serve_load import bench_serve, build_model, report  # noqa: E402
from treemem import measure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT / ".." / "shared" / "bench"
WORK = ROOT / "bench" / "work"
BIN = Path(sys.executable).parent
PIPELINE = str(BIN / "pipeline")
PY = sys.executable


def photos(n: int) -> Path:
    folder = WORK / f"photos{n}"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"building {n} photo JPEGs in {folder} ...", flush=True)
        run([PY, str(SHARED / "make_photo_folder.py"), str(folder), "--n", str(n)])
        (folder / ".complete").touch()
    return folder


def run(cmd: list[str], tree: bool = True) -> dict:
    result = measure([str(c) for c in cmd], tree=tree)
    if result["returncode"] != 0:
        raise SystemExit(f"failed ({result['returncode']}): {' '.join(map(str, cmd))}\n{result['stderr'][-3000:]}")
    return result


def pairs(a: list, b: list, repeats: int) -> tuple[list[dict], list[dict]]:
    """A and B in turn, `repeats` times each, after one warm-up of each.

    The timed runs are not sampled from /proc (that costs the measured command CPU, and
    more for one with workers); the warm-ups are, and give the tree memory columns."""
    warm_a, warm_b = run(a), run(b)
    runs_a, runs_b = [], []
    for _ in range(repeats):
        runs_a.append(run(a, tree=False))
        runs_b.append(run(b, tree=False))
    for runs, warm in ((runs_a, warm_a), (runs_b, warm_b)):
        for r in runs:
            r["tree_pss_mb"] = warm["tree_pss_mb"]
    return runs_a, runs_b


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def paired_ratio(runs_a, runs_b, key: str) -> float:
    return statistics.median(a[key] / b[key] for a, b in zip(runs_a, runs_b))


def wall_and_memory(ra: list[dict], rb: list[dict]) -> str:
    """The table's last three cells: median wall seconds, peak process and tree memory, A / B."""
    return (
        f"| {median(ra, 'wall'):.2f} / {median(rb, 'wall'):.2f} "
        f"| {median(ra, 'max_rss_mb'):.0f} / {median(rb, 'max_rss_mb'):.0f} "
        f"| {median(ra, 'tree_pss_mb'):.0f} / {median(rb, 'tree_pss_mb'):.0f} |"
    )


def bench_prepare(folder: Path, n: int, size: int, repeats: int) -> list[str]:
    a = [PIPELINE, "prepare", folder, "--out", WORK / "pipeline_data", "--size", size, "--augment", 0, "--quiet"]
    b = [PY, SHARED / "seed_style_prepare.py", folder, WORK / "seed_data", "--size", size]
    ra, rb = pairs(a, b, repeats)
    speedup = 1 / paired_ratio(ra, rb, "wall")
    return [
        f"| prepare {n} photos, {size} px, --augment 0 | {n / median(ra, 'wall'):.0f} | {n / median(rb, 'wall'):.0f} "
        f"| **{speedup:.2f}x** {wall_and_memory(ra, rb)}"
    ]


def bench_memory(folder: Path, n: int, size: int) -> list[str]:
    for file in folder.rglob("*.jpg"):  # from the page cache, as the 2,000-photo runs are after warm-up
        file.read_bytes()
    rows = []
    for augment in (0, 1):
        a = run(
            [PIPELINE, "prepare", folder, "--out", WORK / "memory_data", "--size", size, "--augment", augment, "-q"]
        )
        out_mb = sum(f.stat().st_size for f in (WORK / "memory_data").glob("X_*.npy")) / 2**20
        rows.append(
            f"| prepare {n} photos, {size} px, --augment {augment} ({out_mb:.0f} MB of arrays) | {n / a['wall']:.0f} | "
            f"| | {a['wall']:.1f} / | {a['max_rss_mb']:.0f} / | {a['tree_pss_mb']:.0f} / |"
        )
    b = run([PY, SHARED / "seed_style_prepare.py", folder, WORK / "seed_memory", "--size", size])
    rows.append(
        f"| seed_style_prepare.py, same {n} photos, {size} px | | {n / b['wall']:.0f} | | / {b['wall']:.1f} "
        f"| / {b['max_rss_mb']:.0f} | / {b['tree_pss_mb']:.0f} |"
    )
    shutil.rmtree(WORK / "memory_data", ignore_errors=True)
    shutil.rmtree(WORK / "seed_memory", ignore_errors=True)
    return rows


def train_pairs(
    data: Path, model: Path, options: list, repeats: int, reference_epochs: int | None = None
) -> tuple[list[dict], list[dict]]:
    """`pipeline train OPTIONS`, then the reference on the same arrays for as many epochs as
    pipeline ran (or `reference_epochs`), `repeats` times (no warm-up: each run is long, and
    both pay the same start-up). Each run gets ips (training images/s), acc (test accuracy)
    and epochs."""
    ra, rb = [], []
    for _ in range(repeats):
        ra.append(run([PIPELINE, "train", "--data", data, "--out", model, *options, "--quiet"], tree=False))
        summary = json.loads((model / "settings.json").read_text())["summary"]
        evaluate = [PIPELINE, "evaluate", "--data", data, "--model", model, "--json", "-q", "--out", WORK / "reports"]
        ra[-1].update(
            ips=summary["train_images_per_s"],
            acc=json.loads(run(evaluate)["stdout"])["accuracy"],
            epochs=summary["epochs_run"],
            precision=summary["precision"],
        )
        epochs = reference_epochs or summary["epochs_run"]
        rb.append(run([PY, SHARED / "seed_style_train.py", data, "--epochs", epochs], tree=False))
        found = re.search(r"test_accuracy=([\d.]+) train_images_per_s=([\d.]+)", rb[-1]["stdout"])
        rb[-1].update(acc=float(found.group(1)), ips=float(found.group(2)), epochs=epochs)
        print(
            f"  {' '.join(map(str, options)) or 'defaults'}: pipeline {ra[-1]['epochs']} epochs {ra[-1]['wall']:.1f} s "
            f"acc {ra[-1]['acc']:.4f} | reference {epochs} epochs {rb[-1]['wall']:.1f} s acc {rb[-1]['acc']:.4f}",
            flush=True,
        )
    return ra, rb


def train_row(what: str, ra: list[dict], rb: list[dict]) -> str:
    ratio = statistics.median(x["ips"] / y["ips"] for x, y in zip(ra, rb))
    return (
        f"| {what} | {median(ra, 'ips'):.0f} | {median(rb, 'ips'):.0f} | **{ratio:.2f}x** "
        f"| {median(ra, 'wall'):.1f} / {median(rb, 'wall'):.1f} | {median(ra, 'max_rss_mb'):.0f} / {median(rb, 'max_rss_mb'):.0f} "
        f"| test accuracy {median(ra, 'acc'):.4f} / {median(rb, 'acc'):.4f} |"
    )


def bench_train(epochs: int, repeats: int) -> list[str]:
    options = ["--epochs", epochs, "--patience", epochs]
    ra, rb = train_pairs(WORK / "pipeline_data", WORK / "model", options, repeats)
    what = f"train {epochs} epochs on the same arrays ({ra[0]['precision']}; seed: float64 input, batch 32)"
    return [train_row(what, ra, rb)]


def bench_train_accuracy(repeats: int) -> list[str]:
    """Training speed where accuracy means something: sample_data's digits, as `make all`
    prepares them, trained with the defaults (early stopping); the reference trains on the
    same arrays for as many epochs, so both do the same work."""
    data = WORK / "digits_data"
    run([PIPELINE, "prepare", ROOT / "sample_data", "--out", data, "--no-flip", "--quiet"])
    ra, rb = train_pairs(data, WORK / "digits_model", [], repeats)
    what = f"train on sample_data (digits, 32 px, {ra[-1]['epochs']} epochs by early stopping; reference: as many)"
    return [train_row(what, ra, rb)]


def letters_data() -> Path:
    """The letters folder (make_letters_folder.py: A-J in every installed typeface), prepared as
    a user would: 32 px, no augmented copies, no mirroring (a mirrored letter is another symbol)."""
    folder, data = WORK / "letters", WORK / "letters_data"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"building the letters folder in {folder} ...", flush=True)
        run([PY, SHARED / "make_letters_folder.py", folder])  # exits with the apt-get line if fonts are missing
        (folder / ".complete").touch()
    run([PIPELINE, "prepare", folder, "--out", data, "--size", 32, "--augment", 0, "--no-flip", "--quiet"])
    return data


def bench_letters(repeats: int, epoch_counts=(3, 10)) -> list[str]:
    """Where accuracy moves: time to accuracy first (`pipeline train` with no options against
    the reference's 10 epochs, whole process against whole process), then equal epochs at
    pipeline's defaults and at the reference's batch of 32."""
    data, model = letters_data(), WORK / "letters_model"
    n = len(json.loads((data / "report.json").read_text())["counts"])
    ra, rb = train_pairs(data, model, [], repeats, reference_epochs=10)
    ratio = statistics.median(y["wall"] / x["wall"] for x, y in zip(ra, rb))
    rows = [
        f"| **time to accuracy**, letters: `pipeline train` (no options, {median(ra, 'epochs'):.0f} epochs) "
        f"vs the reference's 10 epochs, whole process | {median(ra, 'ips'):.0f} | {median(rb, 'ips'):.0f} "
        f"| **{ratio:.2f}x** (wall) | {median(ra, 'wall'):.1f} / {median(rb, 'wall'):.1f} "
        f"| {median(ra, 'max_rss_mb'):.0f} / {median(rb, 'max_rss_mb'):.0f} "
        f"| test accuracy {median(ra, 'acc'):.4f} / {median(rb, 'acc'):.4f} |"
    ]
    for epochs in epoch_counts:
        for options, how in (([], "pipeline's defaults"), (["--batch-size", 32], "batch 32 both")):
            ra, rb = train_pairs(data, model, ["--epochs", epochs, *options], repeats)
            rows.append(train_row(f"letters ({n} classes), {epochs} epochs, {how}", ra, rb))
    return rows


def bench_phases(data: Path) -> str:
    """Where a short `train` spends its seconds, phase by phase (bench/train_phases.py)."""
    result = run([PY, ROOT / "bench" / "train_phases.py", data, WORK / "phases_model", "--epochs", 3], tree=False)
    return result["stdout"].strip()


def bench_predict(folder: Path, repeats: int) -> list[str]:
    image = sorted(folder.rglob("*.jpg"))[0]
    a = [PIPELINE, "predict", image, "--model", WORK / "model", "--quiet"]
    b = [PY, ROOT / "bench" / "keras_predict.py", WORK / "model", image]
    ra, rb = pairs(a, b, repeats)
    speedup = 1 / paired_ratio(ra, rb, "wall")
    return [
        f"| predict 1 photo, cold process (LiteRT; reference: Keras load_model + call) | | | **{speedup:.2f}x** {wall_and_memory(ra, rb)}"
    ]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_cluster(command: list, n: int) -> tuple[float, list[subprocess.CompletedProcess]]:
    """`command` as n workers of one TF_CONFIG cluster on 127.0.0.1: (wall seconds until the
    last one ends, each worker's result)."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(n)]
    started = time.perf_counter()
    processes = []
    for index in range(n):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(config), "PIPELINE_PROGRESS": "never"}
        processes.append(
            subprocess.Popen(
                [str(c) for c in command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    for process in processes:
        out, err = process.communicate(timeout=3600)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
        if process.returncode != 0:
            raise SystemExit(f"a worker failed ({process.returncode}): {err[-3000:]}")
    return time.perf_counter() - started, results


def bench_workers(epochs: int, repeats: int) -> list[str]:
    """One worker against two on this machine (the same cores: no speed-up to expect), on
    sample_data's digits for `epochs` epochs (no early stop), with the test accuracy each
    reached; and what one all-reduce costs between two local workers."""
    data = WORK / "digits_data"
    if not (data / "classes.json").exists():
        run([PIPELINE, "prepare", ROOT / "sample_data", "--out", data, "--no-flip", "--quiet"])
    options = ["--data", data, "--epochs", epochs, "--patience", epochs, "--quiet"]
    rows, load_before = [], os.getloadavg()[0]
    for n in (1, 2):
        for _ in range(repeats):
            out = WORK / f"workers{n}_model"
            if n == 1:
                wall = run([PIPELINE, "train", *options, "--out", out], tree=False)["wall"]
            else:
                wall, _ = run_cluster([PIPELINE, "train", *options, "--out", out], n)
            summary = json.loads((out / "settings.json").read_text())["summary"]
            evaluate = [PIPELINE, "evaluate", "--data", data, "--model", out, "--json", "-q", "--out", WORK / "reports"]
            accuracy = json.loads(run(evaluate)["stdout"])["accuracy"]
            rows.append(
                f"| {n} | {summary.get('strategy', 'default (fit)')} | {summary.get('global_batch', 128)} "
                f"| {summary['train_images_per_s']:.0f} | {wall:.1f} | {summary['seconds']:.1f} | {accuracy:.4f} |"
            )
    _, results = run_cluster([PY, ROOT / "bench" / "allreduce.py"], 2)
    load = f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    costs = json.loads(results[0].stdout.strip().splitlines()[-1])["seconds"]
    lines = [
        "\n## One worker against two (TF_CONFIG on 127.0.0.1)\n",
        f"`pipeline train` on sample_data's digits, {epochs} epochs, defaults otherwise; two workers are two",
        "processes on the same cores, so no speed-up is to be expected: this is the cost of the",
        "cluster machinery. images/s counts every training image of the run over training time",
        "(the first epoch, which traces the step, included). Load average on this machine (other jobs",
        f"share its cores, so every figure here is noisy): {load}.\n",
        "| workers | strategy | global batch | train images/s | wall s | training s | test accuracy |",
        "|---:|---|---:|---:|---:|---:|---:|",
        *rows,
        "\nOne all-reduce between the two local workers (gRPC ring over loopback), median of 5 x 10 calls:\n",
        *(f"- {what}: {seconds * 1000:.2f} ms" for what, seconds in costs.items()),
        "\nEach training step makes one gradient all-reduce and one of the metrics (with the stop flag).",
        "\nGPUs: no GPU machine was at hand for this run, so there are no GPU images/s here. The GPU paths",
        "are tested on the CPU as far as they can be: the strategy choice for made-up GPU counts (one GPU:",
        "fit in mixed float16; several: MirroredStrategy), and MirroredStrategy over two logical CPU",
        "devices through the custom step (tests/test_distribute.py).",
    ]
    return lines


PHASES_HEAD = """## Where a short train spends its time

`python bench/train_phases.py LETTERS_DATA MODEL --epochs 3` (pipeline's defaults otherwise):
wall and CPU seconds of each phase of one `train_model` call, in order, as one process."""

GROWTH = """
## How the costs grow

- **prepare** time grows linearly with the number of images and with the size of the *source*
  files (decoding dominates; JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, so
  a smaller `--size` decodes faster); it scales with cores (`--workers`, default all).
  Memory stays flat: workers write rows straight into a buffer file and rows move to the
  outputs a bounded chunk at a time, so 10,000 photos at `--size 128` (about 490 MB of
  arrays) peak under 200 MB (about 300 MB with `--augment 1`) for the whole process tree
  (sum of PSS over the parent and its workers); only a few bytes per image (hashes, labels,
  manifest rows) grow with the count. The naive script holds every image in memory: 1.3 GB.
- **train** time grows linearly with images x epochs and with `--size` squared. Arrays that
  fit in half the free memory train from memory (one uint8 copy, no float copy); larger ones
  stream from their memory maps a batch at a time. One tf.data iterator serves the whole run
  (remaking one per epoch stalled each epoch for up to 2.5 s). On CPUs with native bfloat16
  (AVX512-BF16 or AMX) layers compute in mixed bfloat16 (softmax in float32); the saved
  `model.keras` and `model.tflite` are float32 either way, and `settings.json` records the
  precision and input path.
"""


def machine() -> str:
    flags = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        flags = set(re.search(r"^flags\s*:\s*(.+)$", text, re.M).group(1).split())
        name = model.group(1) if model else platform.processor()
    except (OSError, AttributeError):
        name = platform.processor()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    shown = " ".join(f for f in wanted if f in flags) or "none of " + " ".join(wanted)
    return f"{name}, {len(os.sched_getaffinity(0))} cores, CPU flags: {shown}"


SECTIONS = ("prepare", "train", "letters", "phases", "predict", "memory", "serve", "cluster", "workers")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="400 photos, 2,000 for memory, 1 repeat, 2 epochs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers-only", action="store_true", help="only one worker against two; its section of RESULTS.md")
    p.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        help="run these sections only (printed and written to bench/work/RESULTS-only.md, not bench/RESULTS.md)",
    )
    a = p.parse_args()
    if a.workers_only:
        WORK.mkdir(parents=True, exist_ok=True)
        section = "\n".join(bench_workers(5, 1 if a.quick else 2))
        print(section)
        results = ROOT / "bench" / "RESULTS.md"
        text = results.read_text()
        start = text.find("\n## One worker against two")
        if start >= 0:
            end = text.find("\n## ", start + 5)
            text = text[:start] + (text[end:] if end >= 0 else "")
        results.write_text(text.rstrip("\n") + "\n" + section + "\n")
        print("\nwritten to bench/RESULTS.md")
        return
    n, n_memory, repeats, epochs = (400, 2000, 1, 2) if a.quick else (2000, 10000, a.repeats, a.epochs)
    sections = a.only or SECTIONS
    WORK.mkdir(parents=True, exist_ok=True)
    rows, phases = [], ""
    if "prepare" in sections or "predict" in sections or "train" in sections:
        folder = photos(n)
    if "prepare" in sections or "train" in sections:  # train's photo rows read prepare's arrays
        rows += bench_prepare(folder, n, 64, repeats if a.quick else max(repeats, 5))  # short runs: more pairs
    if "train" in sections:
        rows += bench_train(epochs, repeats)
        rows += bench_train_accuracy(1 if a.quick else 2)
    if "letters" in sections:
        rows += bench_letters(repeats, (2,) if a.quick else (3, 10))
    if "predict" in sections:
        if not (WORK / "model" / "model.tflite").exists():
            bench_train(1, 1)  # a model to predict with
        rows += bench_predict(folder, repeats)
    if "memory" in sections:
        rows += bench_memory(photos(n_memory), n_memory, 128)
    if "phases" in sections:
        phases = bench_phases(letters_data())
    if "serve" in sections:  # a model at the default size (32 px, 1 epoch) on 200 photos, as make bench-serve
        served = bench_serve(*build_model(200), requests=400 if a.quick else 2000, cold_runs=repeats + 2)
    if "cluster" in sections:  # the cluster's overhead on this machine, and the client's global step at scale
        cluster_rows = dask_bench.compare(photos(n), 64, 0, repeats)
        sizes = [100_000, 1_000_000] if a.quick else [1_000_000, 10_000_000]
        global_rows = global_step.rows(sizes, list(global_step.STEPS), timeout=900, repeats=repeats)
    command = "make bench" if not (a.quick or a.only) else "python bench/run_bench.py " + " ".join(sys.argv[1:])
    table = "\n".join(
        [
            f"# Benchmark results\n\n{datetime.date.today().isoformat()}, `{command}`, on {machine()}.\n",
            "Ratios are medians of pairs run in turn (pipeline, then reference) as whole processes;",
            "pipeline / reference in each cell. peak: largest single process (as /usr/bin/time -v);",
            "tree: largest sum of PSS over the process and its workers, sampled every 20 ms from /proc",
            "in separate runs (the warm-ups and the memory rows): sampling slows the command measured.",
            "Every training speed has the test accuracy each side reached beside it.\n",
            "| what | pipeline images/s | reference images/s | speed-up | wall s | peak MB | tree MB / note |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    if phases:
        table += "\n\n" + PHASES_HEAD + "\n```\n" + phases + "\n```\n"
    if "serve" in sections:
        table += "\n\n## serve: `pipeline serve` under load on loopback (bench/serve_load.py)\n\n"
        table += "16 client threads in the benchmark's process, on the same CPU as the server.\n\n"
        table += "\n".join(report(served)) + "\n"
    table += "\n" + GROWTH
    if "cluster" in sections:
        table += "\n".join(
            [
                "\n## prepare on a Dask cluster\n",
                "`python bench/dask_bench.py FOLDER`: a 2-worker LocalCluster on this machine (overhead, not speed-up).\n",
                dask_bench.HEADER,
                *cluster_rows,
                f"\n`python bench/global_step.py 1000000 10000000 --repeats {repeats}`: the client's steps on",
                "synthetic hashes (1% exact and 5% near copies planted), the median run's time and the range;",
                "`-`: stopped after 900 s.\n",
                global_step.HEADER,
                *global_rows,
            ]
        )
    if "workers" in sections:
        table += "\n".join(bench_workers(5, 1 if a.quick else 2)) + "\n"
    print(table)
    if a.only:
        (WORK / "RESULTS-only.md").write_text(table)
        print(f"\nwritten to {WORK / 'RESULTS-only.md'}")
    elif not a.quick:
        (ROOT / "bench" / "RESULTS.md").write_text(table)
        print("\nwritten to bench/RESULTS.md")


if __name__ == "__main__":
    main()
