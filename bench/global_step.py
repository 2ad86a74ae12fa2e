"""The global step of prepare at scale: what the client does on hashes alone, whatever runs the decoding.

Synthetic inputs for N images: a 16-byte pixel digest and a 64-bit perceptual hash each,
10 classes; 1% of the images are exact copies of another (same digest and hash, same
class), 5% near copies (their hash with 1 to 4 random bits flipped, their thumbnail the
original's). Times and peak memory
(tracemalloc, which counts numpy's buffers and Python objects) of the three client steps
prepare runs, each in a fresh process:

  exact:  dedup.find_exact_duplicates(digests, labels)
  near:   dedup.near_copy_groups(hashes, thumbnails_of, 6): candidates by hash, confirmed on
          synthetic 32x32 thumbnails (each picture's own pseudo-random pixels, a copy's the
          same as its original's), as prepare reads them from the decode buffer
  split:  splits.split_by_group(labels, groups, 0.2, 0.1, seed, classes)

    python bench/global_step.py 1000000            # one size, every step
    python bench/global_step.py 1000000 10000000 --steps exact split
    python bench/global_step.py 1000000 10000000 --repeats 3   # median time of 3 runs, (range)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STEPS = ("exact", "near", "split")
HEADER = "| step | images | wall s (CPU s) [range] | peak MB (tracemalloc) | found |\n|---|---:|---:|---:|---|"


def synthetic(n: int, seed: int = 0) -> tuple[list[bytes], np.ndarray, np.ndarray, np.ndarray]:
    """(digests, perceptual hashes, labels, picture of each) with planted exact and near duplicates."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(
        np.uint64
    )
    labels = rng.integers(0, 10, n)
    digest_ids = np.arange(n)
    exact = rng.choice(n, n // 100, replace=False)  # copies of the image before them
    originals = np.maximum(exact - 1 - rng.integers(0, 1000, len(exact)), 0)
    digest_ids[exact], hashes[exact], labels[exact] = digest_ids[originals], hashes[originals], labels[originals]
    near = rng.choice(n, n // 20, replace=False)
    flips = np.zeros(len(near), dtype=np.uint64)
    for _ in range(4):  # up to 4 distinct-or-repeated bits: distance 1 to 4
        flips |= np.uint64(1) << rng.integers(0, 64, len(near)).astype(np.uint64)
    sources = rng.integers(0, n, len(near))
    hashes[near], labels[near] = hashes[sources] ^ flips, labels[sources]
    picture = digest_ids.copy()
    picture[near] = picture[sources]
    digests = [int(d).to_bytes(16, "little") for d in digest_ids]
    return digests, hashes, labels.astype(np.int64), picture


def thumbnails(picture: np.ndarray) -> np.ndarray:
    """A 32x32 thumbnail per picture id: pseudo-random pixels, the same for the same id."""
    mixed = picture[:, None].astype(np.uint64) * np.uint64(2654435761) + np.arange(1024, dtype=np.uint64) * np.uint64(
        40503
    )
    return ((mixed ^ (mixed >> np.uint64(13))) % np.uint64(251)).astype(np.float32)


def run_step(step: str, n: int, trace: bool) -> dict:
    from pipeline.data import dedup, splits

    digests, hashes, labels, picture = synthetic(n)
    groups = np.arange(n) if step == "split" else None
    if step == "split":  # the split takes the near-duplicate groups: rebuild them cheaply (identical hashes)
        _, groups = np.unique(hashes, return_inverse=True)
    if trace:
        tracemalloc.start()
    start, cpu = time.perf_counter(), time.process_time()
    if step == "exact":
        found = dedup.find_exact_duplicates(digests, labels.tolist())
        detail = f"{len(found[1])} duplicate groups, {len(found[2])} label conflicts"
    elif step == "near":
        groups = dedup.near_copy_groups(hashes, lambda rows: thumbnails(picture[rows]), 6)
        detail = f"{n - len(np.unique(groups))} images joined a near-duplicate group"
    else:
        split_of = splits.split_by_group(labels, groups, 0.2, 0.1, 42, [str(c) for c in range(10)])
        detail = f"test {int((split_of == 'test').sum())}"
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = tracemalloc.get_traced_memory()[1] if trace else 0
    return {"step": step, "n": n, "seconds": seconds, "cpu": cpu, "peak_mb": peak / 2**20, "detail": detail}


def measure(step: str, n: int, timeout: float, repeats: int = 1) -> dict:
    """Time without tracing (the median of `repeats` runs), then peak memory with tracemalloc
    on (it slows Python code), each in a fresh process."""
    found = {"step": step, "n": n, "runs": []}
    for trace in [False] * repeats + [True]:
        cmd = [sys.executable, __file__, "--one", step, str(n)] + (["--trace"] if trace else [])
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
        except subprocess.TimeoutExpired:
            found["seconds" if not trace else "peak_mb"] = None
            found["note"] = f"stopped after {timeout:.0f} s"
            break
        result = json.loads(out.splitlines()[-1])
        if trace:
            found["peak_mb"] = result["peak_mb"]
        else:
            found["runs"].append((result["seconds"], result["cpu"]))
        found["detail"] = result["detail"]
    if found["runs"]:
        found["seconds"], found["cpu"] = sorted(found["runs"])[len(found["runs"]) // 2]  # the median run
    return found


def rows(sizes: list[int], steps: list[str], timeout: float, repeats: int = 1) -> list[str]:
    lines = []
    for n in sizes:
        for step in steps:
            r = measure(step, n, timeout, repeats)
            seconds = f"{r['seconds']:.1f} ({r['cpu']:.1f})" if r.get("seconds") is not None else "-"
            if len(r["runs"]) > 1:
                seconds += f" [{min(t for t, _ in r['runs']):.1f}-{max(t for t, _ in r['runs']):.1f}]"
            peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "-"
            line = f"| {step} | {n:,} | {seconds} | {peak} | {r.get('detail', '')} {r.get('note', '')} |"
            print(line, flush=True)
            lines.append(line)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each step; the median is reported")
    p.add_argument("--one", nargs=2, metavar=("STEP", "N"), help=argparse.SUPPRESS)
    p.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_step(a.one[0], int(a.one[1]), a.trace)))
        return
    print(HEADER)
    rows(a.sizes, a.steps, a.timeout, a.repeats)


if __name__ == "__main__":
    main()
