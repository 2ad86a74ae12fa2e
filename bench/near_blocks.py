"""Near-duplicate pairs with r = 1, 2, ... blocks made to match, side by side on the same
synthetic hashes (global_step.py's: 5 % near copies planted): CPU seconds per r, in turn,
and the pairs found (the same for every r), with the medians. How `dedup.SORT_COST` was set.

    python bench/near_blocks.py 1000000 --repeats 3             # r = 1 against r = 2
    python bench/near_blocks.py 10000000 --r 2 3 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from global_step import synthetic  # noqa: E402

from pipeline.data import dedup  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("n", type=int)
    p.add_argument("--r", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--distance", type=int, default=4)
    a = p.parse_args()
    _, hashes, _, _ = synthetic(a.n)
    unique = np.unique(hashes)
    seconds: dict[int, list[float]] = {r: [] for r in a.r}
    print(
        f"{len(unique):,} distinct hashes; the cost model picks r = {dedup._blocks_to_match(len(unique), a.distance)}"
    )
    for _ in range(a.repeats):
        found = []
        for r in a.r:
            start = time.process_time()
            found.append(len(dedup._close_pairs(unique, a.distance, r)))
            seconds[r].append(time.process_time() - start)
        print(" | ".join(f"r = {r}: {seconds[r][-1]:.2f} s" for r in a.r), f"| pairs {found}", flush=True)
    print("medians:", ", ".join(f"r = {r}: {statistics.median(v):.2f} s" for r, v in seconds.items()))


if __name__ == "__main__":
    main()
