"""prepare's per-file cache (issue 23): a fresh run against re-runs after small changes.

Builds a photo folder with ../shared/bench/make_photo_folder.py (into bench/work/, ignored
by git), then times whole `pipeline prepare` processes at --size 64, --augment 0:

- fresh, --no-cache, against fresh with an empty cache (in turn: A B B A A B ...);
- a re-run with nothing changed, with 1 % of the files added, 1 % relabelled (moved to
  another class folder), 1 % edited (rewritten with other pixels): each timed run follows
  an untimed one that fills the cache from the folder as it was, and the change is undone
  after it.

Prints medians (wall, CPU of the whole process tree, the largest process's peak memory)
and each median's ratio to the fresh --no-cache run; also checks that every run's arrays,
manifest and report.json equal a --no-cache run's of the same folder.

    python bench/cache_bench.py                       # 20,000 photos, 5 repeats (the issue's figures)
    python bench/cache_bench.py --n 2000 --repeats 3  # a quick check
    python bench/cache_bench.py --side-by-side 7      # also 7 fresh pairs run at once, a core each
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import statistics
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from treemem import measure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# ../shared beside the checkout (make bench's place), or beside the folder of worktrees
SHARED = next(
    (p for p in (ROOT / ".." / "shared" / "bench", ROOT / ".." / ".." / "shared" / "bench") if p.is_dir()), None
)
WORK = ROOT / "bench" / "work"
PY = sys.executable
OUTPUTS = ("X_train.npy", "X_val.npy", "X_test.npy", "y_train.npy", "y_val.npy", "y_test.npy", "manifest.csv")


def photo_folder(name: str, n: int, seed: int) -> Path:
    folder = WORK / name
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"building {n} photo JPEGs in {folder} ...", flush=True)
        run([PY, SHARED / "make_photo_folder.py", folder, "--n", n, "--seed", seed])
        (folder / ".complete").touch()
    return folder


def run(cmd: list) -> dict:
    result = measure([str(c) for c in cmd], tree=False)
    if result["returncode"] != 0:
        raise SystemExit(f"failed ({result['returncode']}): {' '.join(map(str, cmd))}\n{result['stderr'][-3000:]}")
    return result


def prepare(folder: Path, out: Path, cache: Path | None, augment: int, core: int | None = None) -> dict:
    """A whole prepare process; with `core`, one decoding process pinned to that core."""
    cmd = [PY, "-m", "pipeline", "prepare", folder, "--out", out, "--size", 64, "--augment", augment, "-q"]
    pinned = ["taskset", "-c", core] if core is not None else []
    return run(pinned + cmd + (["--cache", cache] if cache else ["--no-cache"]) + (["--workers", 1] if pinned else []))


def side_by_side(folder: Path, work: Path, pairs: int, augment: int) -> list[float]:
    """Fresh runs of both arms at the same time, one process each pinned to its own core
    (swapped every pair): both meet the machine's speed of that minute, which on a shared
    VM moves whole sequential runs by a fifth. Returns the pairs' cached / --no-cache walls."""
    ratios = []
    for pair in range(pairs):
        cores = {"cache": pair % 2, "no-cache": 1 - pair % 2}
        shutil.rmtree(work / "sbs", ignore_errors=True)
        results: dict[str, dict] = {}

        def arm(name: str, core: int, results: dict = results) -> None:
            cache = work / "sbs" / "cache" if name == "cache" else None
            results[name] = prepare(folder, work / "sbs" / f"out-{name}", cache, augment, core)

        threads = [threading.Thread(target=arm, args=(name, core)) for name, core in cores.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert same_outputs(work / "sbs" / "out-cache", work / "sbs" / "out-no-cache"), "side by side: outputs differ"
        ratios.append(results["cache"]["wall"] / results["no-cache"]["wall"])
        print(
            f"side by side {pair + 1}: cache on core {cores['cache']} {results['cache']['wall']:.2f} s "
            f"(CPU {results['cache']['cpu']:.2f}), --no-cache {results['no-cache']['wall']:.2f} s "
            f"(CPU {results['no-cache']['cpu']:.2f}), ratio {ratios[-1]:.3f}",
            flush=True,
        )
    return ratios


def same_outputs(a: Path, b: Path) -> bool:
    if not all(filecmp.cmp(a / name, b / name, shallow=False) for name in OUTPUTS):
        return False
    # report.json names the images folder; everything else must match byte for byte
    return (a / "report.json").read_bytes() == (b / "report.json").read_bytes()


class Change:
    """1 % of the files added, relabelled or edited, and undone again."""

    def __init__(self, kind: str, folder: Path, extra: Path, fraction: float = 0.01):
        self.kind, self.folder = kind, folder
        files = sorted(folder.glob("class_*/*.jpg"))
        k = max(1, int(len(files) * fraction))
        self.picked = files[:: max(1, len(files) // k)][:k]
        self.extra = sorted(extra.glob("class_*/*.jpg"))[:k]
        self.done: list = []

    def apply(self) -> None:
        if self.kind == "added":
            for i, src in enumerate(self.extra):
                dst = self.folder / src.parent.name / f"added_{i:06d}.jpg"
                shutil.copyfile(src, dst)
                self.done.append(dst)
        elif self.kind == "relabelled":
            for path in self.picked:
                other = "class_0" if path.parent.name != "class_0" else "class_1"
                dst = self.folder / other / path.name
                path.rename(dst)
                self.done.append((dst, path))
        elif self.kind == "edited":
            for path in self.picked:
                original = path.read_bytes()
                pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
                Image.fromarray(np.clip(255 - pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
                self.done.append((path, original))

    def undo(self) -> None:
        for item in self.done:
            if self.kind == "added":
                item.unlink()
            elif self.kind == "relabelled":
                item[0].rename(item[1])
            else:
                item[0].write_bytes(item[1])
        self.done = []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--augment", type=int, default=0, help="prepare's --augment (its default is 1)")
    p.add_argument("--pairs", type=int, default=0, help="fresh pairs to time (default: --repeats)")
    p.add_argument("--fresh-only", action="store_true", help="time the fresh pairs only")
    p.add_argument(
        "--side-by-side", type=int, default=0, help="also N fresh pairs run at once, a core each (--workers 1)"
    )
    a = p.parse_args()
    folder = photo_folder(f"cache_photos{a.n}", a.n, 0)
    extra = photo_folder(f"cache_extra{a.n}", max(4, a.n // 100), 1)
    work = WORK / "cache_runs"
    shutil.rmtree(work, ignore_errors=True)
    cache, out, reference = work / "cache", work / "data", work / "reference"
    rows: dict[str, list[dict]] = {"fresh, --no-cache": [], "fresh, empty cache": []}
    arms = {"fresh, --no-cache": (reference, None), "fresh, empty cache": (out, cache)}
    for pair in range(a.pairs or a.repeats):  # in turn, first one then the other: the drift falls on both alike
        for arm in list(arms)[:: 1 if pair % 2 == 0 else -1]:
            shutil.rmtree(cache, ignore_errors=True)
            rows[arm].append(prepare(folder, *arms[arm], a.augment))
        assert same_outputs(out, reference), "a fresh cached run differs from --no-cache"
    for kind in () if a.fresh_only else ("unchanged", "added", "relabelled", "edited"):
        rows[f"re-run, {kind}" if kind == "unchanged" else f"re-run, 1 % {kind}"] = runs = []
        change = Change(kind, folder, extra)
        for repeat in range(a.repeats):
            prepare(folder, out, cache, a.augment)  # the cache as the folder was
            if kind != "unchanged":
                change.apply()
            try:
                runs.append(prepare(folder, out, cache, a.augment))
                if repeat == 0:  # the same change each time: checked once
                    prepare(folder, reference, None, a.augment)
                    assert same_outputs(out, reference), f"re-run after 1 % {kind} differs from --no-cache"
            finally:
                change.undo()
    base = statistics.median(r["wall"] for r in rows["fresh, --no-cache"])
    base_cpu = statistics.median(r["cpu"] for r in rows["fresh, --no-cache"])
    paired = statistics.median(
        c["wall"] / f["wall"] for c, f in zip(rows["fresh, empty cache"], rows["fresh, --no-cache"], strict=True)
    )
    print(f"\n{a.n} photos, 64 px, --augment {a.augment}, medians of {a.repeats}; outputs byte-identical to --no-cache")
    pairs_cpu = [
        c["cpu"] / f["cpu"] for c, f in zip(rows["fresh, empty cache"], rows["fresh, --no-cache"], strict=True)
    ]
    print(
        f"fresh with an empty cache against --no-cache, median of the {len(pairs_cpu)} pairs: {paired:.3f} wall, "
        f"{statistics.median(pairs_cpu):.3f} CPU (CPU pairs {min(pairs_cpu):.3f}-{max(pairs_cpu):.3f})\n"
    )
    print("| run | wall s | / fresh | CPU s | / fresh | peak MB |")
    print("|---|---|---|---|---|---|")
    for name, runs in rows.items():
        wall = statistics.median(r["wall"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        peak = statistics.median(r["max_rss_mb"] for r in runs)
        print(f"| {name} | {wall:.2f} | {wall / base:.3f} | {cpu:.2f} | {cpu / base_cpu:.3f} | {peak:.0f} |")
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    print(f"\ncache: {size / 2**20:.0f} MB for {a.n} photos")
    if a.side_by_side:
        ratios = side_by_side(folder, work, a.side_by_side, a.augment)
        print(
            f"\nfresh with an empty cache against --no-cache, side by side (a core each, --workers 1), "
            f"median of {len(ratios)} pairs: {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
