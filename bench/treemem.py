"""Run one command and measure it the way /usr/bin/time -v would, plus its whole process tree.

    python bench/treemem.py CMD [ARG ...]   -> prints one JSON line on stderr

wall: seconds from start to exit (time.perf_counter). max_rss_mb: the largest single
process of the tree (os.wait4's rusage, like getrusage(RUSAGE_CHILDREN)). tree_pss_mb /
tree_rss_mb: the largest sum over the command and all its descendants, sampled every 20 ms
from /proc (PSS splits pages shared between forked workers fairly, so its sum is the real
footprint; the RSS sum counts shared pages once per process and overstates it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def _tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += _children(p)
    return tree


def _memory_kb(pid: int) -> tuple[int, int]:
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def measure(cmd: list[str], env: dict | None = None, interval: float = 0.02, tree: bool = True) -> dict:
    """Run `cmd`; `tree=False` skips the /proc sampling (tree_* are then 0). Sampling a
    TensorFlow process's threads and maps every 20 ms slowed its training by a quarter."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak = {"pss": 0, "rss": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            sums = [_memory_kb(p) for p in _tree(proc.pid)]
            peak["pss"] = max(peak["pss"], sum(s[0] for s in sums))
            peak["rss"] = max(peak["rss"], sum(s[1] for s in sums))
            done.wait(interval)

    sampler = threading.Thread(target=sample if tree else done.wait, daemon=True)
    sampler.start()
    out = {"stdout": b"", "stderr": b""}
    readers = [
        threading.Thread(target=lambda k=k, s=s: out.__setitem__(k, s.read()), daemon=True)
        for k, s in (("stdout", proc.stdout), ("stderr", proc.stderr))
    ]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "max_rss_mb": usage.ru_maxrss / 1024,
        "tree_pss_mb": peak["pss"] / 1024,
        "tree_rss_mb": peak["rss"] / 1024,
        "stdout": out["stdout"].decode(errors="replace"),
        "stderr": out["stderr"].decode(errors="replace"),
    }


if __name__ == "__main__":
    result = measure(sys.argv[1:])
    sys.stdout.write(result.pop("stdout"))
    sys.stderr.write(result.pop("stderr"))
    print(json.dumps(result), file=sys.stderr)
    sys.exit(result["returncode"])
