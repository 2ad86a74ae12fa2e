"""prepare on a Dask cluster against prepare on local processes, on this machine.

Starts a `distributed.LocalCluster` of 2 single-threaded worker processes on 127.0.0.1 in
this process (its start-up is timed apart: a real cluster is already running), then runs
`pipeline prepare FOLDER` and `pipeline prepare FOLDER --scheduler ADDRESS` in turn as
whole processes and reports the median wall time, the client's peak memory (the largest
single process of the command: with --scheduler that is the client alone, the workers
being the cluster's) and whether the two runs wrote the same bytes. On two cores the
cluster cannot be faster: the figure is its overhead (task messages, the scheduler, the
workers' own imports), not a speed-up.

    python bench/dask_bench.py bench/work/photos2000 --size 64 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from treemem import measure  # noqa: E402

BIN = Path(sys.executable).parent
WORK = Path(__file__).resolve().parent / "work"


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def run(cmd: list) -> dict:
    result = measure([str(c) for c in cmd], tree=False)
    if result["returncode"] != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{result['stderr'][-2000:]}")
    return result


def compare(folder: Path, size: int, augment: int, repeats: int) -> list[str]:
    import distributed

    started = time.perf_counter()
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    )
    start_s = time.perf_counter() - started
    try:
        common = ["--size", size, "--augment", augment, "--quiet"]
        local = [BIN / "pipeline", "prepare", folder, "--out", WORK / "dask_local", *common]
        remote = [BIN / "pipeline", "prepare", folder, "--out", WORK / "dask_cluster", *common]
        remote += ["--scheduler", cluster.scheduler_address]
        run(local), run(remote)  # warm-up: page cache, the workers' first imports
        ra, rb = [], []
        for _ in range(repeats):
            ra.append(run(local))
            rb.append(run(remote))
    finally:
        cluster.close()
    same = digest(WORK / "dask_local") == digest(WORK / "dask_cluster")
    n = sum(1 for _ in folder.rglob("*.jpg"))
    wall_a, wall_b = (statistics.median(r["wall"] for r in runs) for runs in (ra, rb))
    rss_a, rss_b = (statistics.median(r["max_rss_mb"] for r in runs) for runs in (ra, rb))
    return [
        f"| prepare {n} photos, {size} px, --augment {augment}: local (all cores) / 2-worker LocalCluster "
        f"| {n / wall_a:.0f} / {n / wall_b:.0f} | {wall_a:.2f} / {wall_b:.2f} | {rss_a:.0f} / {rss_b:.0f} "
        f"| {'yes' if same else 'NO'} | cluster start {start_s:.1f} s, not counted |"
    ]


HEADER = "| what | images/s | wall s | client peak MB | same bytes | note |\n|---|---:|---:|---:|---|---|"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--augment", type=int, nargs="+", default=[0, 1])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    print(HEADER)
    for augment in a.augment:
        for line in compare(a.folder, a.size, augment, a.repeats):
            print(line, flush=True)


if __name__ == "__main__":
    main()
