"""What prepare's cache costs a fresh run, measured where whole runs on this machine cannot show it.

Whole `pipeline prepare --no-cache` runs of the same 20,000 photos took 48-59 s of CPU
here for the same work (bench/RESULTS.md): a cost of a few per cent is under what a
bench of whole runs resolves (cache_bench.py's fresh pairs scatter from 0.85 to 1.20).
This script measures the cache's extra work itself, each task with the cache and
without in turn, in one process, by CPU time, over a sample of the folder:

- decoding: `decoding._decode_chunk` on 32 files (read, hash, look up, decode, and with
  the cache the entry and its pack);
- augmenting: `augment.augment_images` and the pack for the same rows (--augment 1);
- prepare's own process, once, at the whole folder's size: `cache_index.start_run` and
  `finish_run` (the index of every entry, the size limit) and the stat index.

It then puts that extra beside one whole `--no-cache` run's CPU and wall, timed here
(median of --runs): CPU ratio = 1 + extra / CPU; wall ratio = 1 + (the workers' extra /
workers + the parent's) / wall: the workers' share spreads over the cores as decoding does.

    python bench/cache_cost.py                 # the 20,000-photo folder cache_bench.py builds
    python bench/cache_cost.py --chunks 30     # a quicker sample
"""

from __future__ import annotations

import os

# as prepare's CLI does (cli.one_blas_thread): one OpenBLAS thread, or the perceptual hashes'
# matrix products spin a second thread whose CPU time process_time counts, at random
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import shutil
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cache_bench import PY, WORK, photo_folder, run  # noqa: E402

from pipeline import prepare as prepare_module  # noqa: E402
from pipeline.core import progress  # noqa: E402
from pipeline.core.settings import PrepareSettings  # noqa: E402
from pipeline.data import augment, cache_index, decoding, stat_index  # noqa: E402
from pipeline.data.cache import CacheCounts, EntryStore  # noqa: E402
from pipeline.data.data_folder import create_rows_file  # noqa: E402
from pipeline.data.worker_pool import available_cores  # noqa: E402

SIZE, COLOR = 64, "rgb"


def interleaved(files: list[str], chunks: int, rounds: int) -> dict:
    """The cache's extra CPU per file decoded and per image augmented, each task timed
    with and without the cache in turn (the order swapped every task)."""
    picks = np.linspace(0, len(files) - decoding.DECODE_CHUNK, chunks).astype(int).tolist()
    tmp = Path(tempfile.mkdtemp(prefix="cache-cost-"))
    try:
        buffer = tmp / "rows.npy"
        offset = create_rows_file(buffer, (len(picks) * decoding.DECODE_CHUNK, SIZE, SIZE, 3))
        cpu = {"decode": [0.0, 0.0], "augment": [0.0, 0.0]}  # [without, with]
        for r in range(-1, rounds):  # round -1 warms up (imports, the augmenter): not counted
            for j, start in enumerate(picks if r >= 0 else picks[:2]):
                chunk = files[start : start + decoding.DECODE_CHUNK]
                rows_at = j * decoding.DECODE_CHUNK
                order = (0, 1) if (r + j) % 2 == 0 else (1, 0)
                for with_cache in order:
                    cache_dir = str(tmp / "cache") if with_cache else ""  # never indexed: every look-up misses
                    args = (str(buffer), offset, rows_at, chunk, SIZE, COLOR, cache_dir, [None] * len(chunk))
                    started = time.process_time()
                    results, *_ = decoding._decode_chunk(args)
                    cpu["decode"][with_cache] += (time.process_time() - started) * (r >= 0)
                rows = np.load(buffer, mmap_mode="r", allow_pickle=False)
                ok = [i for i, result in enumerate(results) if result[0] is None]
                digests = [results[i][1] for i in ok]
                sources = np.array([rows_at + i for i in ok], dtype=np.int64)
                for with_cache in order:
                    store = EntryStore(tmp / "cache") if with_cache else None
                    started = time.process_time()
                    augment.augment_images(rows, sources, digests, 1, 42, True, store, CacheCounts())
                    if store is not None:
                        store.flush()
                    cpu["augment"][with_cache] += (time.process_time() - started) * (r >= 0)
                del rows
        files_done = rounds * len(picks) * decoding.DECODE_CHUNK
        return {
            "files": files_done,
            "decode_us_per_file": [round(v / files_done * 1e6, 1) for v in cpu["decode"]],
            "augment_us_per_image": [round(v / files_done * 1e6, 1) for v in cpu["augment"]],
            "decode_extra_us": (cpu["decode"][1] - cpu["decode"][0]) / files_done * 1e6,
            "augment_extra_us": (cpu["augment"][1] - cpu["augment"][0]) / files_done * 1e6,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parent_extra(folder: Path) -> tuple[float, dict]:
    """CPU seconds prepare's own process spends on the cache in one whole fresh run (start_run,
    finish_run, the stat index), and the run's report (how many images it augmented)."""
    spent: dict[str, float] = {}

    def timed(module, name):
        inner = getattr(module, name)

        def call(*args, **kwargs):
            started = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.process_time() - started

        setattr(module, name, call)
        return inner

    saved = [(m, n, timed(m, n)) for m, n in ((cache_index, "start_run"), (cache_index, "finish_run"))]
    saved += [(stat_index, n, timed(stat_index, n)) for n in ("load", "save")]
    tmp = Path(tempfile.mkdtemp(prefix="cache-cost-run-"))
    try:
        progress.set_quiet(True)
        settings = dataclasses.replace(PrepareSettings(), size=SIZE, augment=1, cache=str(tmp / "cache"))
        report = prepare_module.prepare_dataset(folder, tmp / "out", settings)
    finally:
        for module, name, inner in saved:
            setattr(module, name, inner)
        shutil.rmtree(tmp, ignore_errors=True)
    return sum(spent.values()), {k: round(v, 3) for k, v in spent.items()} | {"report": report}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--chunks", type=int, default=60, help="decoding tasks of 32 files sampled across the folder")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="whole --no-cache runs, for the denominator")
    a = p.parse_args()
    folder = photo_folder(f"cache_photos{a.n}", a.n, 0)
    files = sorted(str(f) for f in folder.glob("class_*/*.jpg"))
    measured = interleaved(files, a.chunks, a.rounds)
    parent_s, parent_parts = parent_extra(folder)
    report = parent_parts.pop("report")
    n_augmented = report["totals"]["train_rows"] - report["totals"]["train"]  # one copy per training image
    out = WORK / "cache_cost_out"
    whole = []
    for _ in range(a.runs):
        shutil.rmtree(out, ignore_errors=True)
        cmd = [PY, "-m", "pipeline", "prepare", folder, "--out", out, "--size", SIZE, "--augment", 1, "-q"]
        whole.append(run(cmd + ["--no-cache"]))
    shutil.rmtree(out, ignore_errors=True)
    wall = statistics.median(r["wall"] for r in whole)
    cpu = statistics.median(r["cpu"] for r in whole)
    n_files = len(files)
    workers_extra = (measured["decode_extra_us"] * n_files + measured["augment_extra_us"] * n_augmented) / 1e6
    cores = available_cores()
    print(f"{n_files} photos, {SIZE} px, --augment 1; sample of {measured['files']} files, interleaved task by task")
    print(f"decoding, CPU per file without / with the cache: {measured['decode_us_per_file']} us")
    print(f"augmenting, CPU per image without / with the cache: {measured['augment_us_per_image']} us")
    print(
        f"the cache's extra: {measured['decode_extra_us']:.1f} us per file decoded, "
        f"{measured['augment_extra_us']:.1f} us per image augmented ({n_augmented} images): "
        f"{workers_extra:.2f} s of the workers' CPU; prepare's process {parent_s:.2f} s {parent_parts}"
    )
    print(
        f"a whole --no-cache run, median of {a.runs}: {wall:.2f} s wall, {cpu:.2f} s CPU "
        f"(runs {', '.join(format(r['wall'], '.1f') for r in whole)} s)"
    )
    print(
        f"fresh with the cache against --no-cache: CPU {1 + (workers_extra + parent_s) / cpu:.3f}, "
        f"wall {1 + (workers_extra / cores + parent_s) / wall:.3f} ({cores} cores)"
    )


if __name__ == "__main__":
    main()
