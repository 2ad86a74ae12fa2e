"""Near copies against look-alikes: what prepare's grouping keeps together, and what it does
to each class's split (issue 33; figures in docs/prepare.md and bench/RESULTS.md).

    python bench/near_copies.py --copies-from ../work/stamps ../work/letters \
        --lookalikes ../work/cases ../work/letters sample_data --work bench/work/near_copies

Copies: each picture of the --copies-from folders (up to --per-folder of them, evenly
spaced) is written beside every kind of copy a folder of photos holds (resized, JPEG at
95 ... 15, cropped 1.5 and 3 % a side, darker and brighter, grey, EXIF-rotated, a patch
painted over), all in its class folder; `pipeline prepare` (defaults, no augmentation)
runs on them, and each kind's line says how many copies ended in their original's group
(or were removed as its exact duplicate) and how many in its split.

Look-alikes: `pipeline prepare` on each --lookalikes folder at --seeds: the largest
near-copy group, how many groups and how many across classes, and each class's test and
validation shares (min-max over classes) against what scikit-learn's StratifiedGroupKFold
(10 folds: 2 test, 1 validation, 7 train) makes of the same groups.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def kinds_of_copy(picture: Image.Image) -> dict[str, tuple[Image.Image, str, dict]]:
    """(picture, format, options) of each kind of copy, by kind."""
    w, h = picture.size
    exif = Image.Exif()
    exif[0x0112] = 6  # stored a quarter turned, shown upright
    patched = np.asarray(picture).copy()
    s = max(1, min(w, h) // 12)
    patched[h // 3 : h // 3 + s, w // 3 : w // 3 + s] = 0
    found = {"resized-half": (picture.resize((max(8, w // 2), max(8, h // 2)), Image.Resampling.LANCZOS), "PNG", {})}
    for q in (95, 75, 50, 30, 15):
        found[f"jpeg-{q}"] = (picture, "JPEG", {"quality": q})
    for share in (0.015, 0.03):
        cx, cy = round(w * share), round(h * share)
        found[f"crop-{share * 100:g}%"] = (picture.crop((cx, cy, w - cx, h - cy)), "PNG", {})
    for factor in (0.85, 1.15):
        found[f"brightness-{factor:g}"] = (ImageEnhance.Brightness(picture).enhance(factor), "JPEG", {"quality": 90})
    found["grey"] = (picture.convert("L"), "PNG", {})
    found["exif-rotated"] = (picture.transpose(Image.Transpose.ROTATE_90), "JPEG", {"quality": 90, "exif": exif})
    found["patched"] = (Image.fromarray(patched), "PNG", {})
    return found


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def write_copies(sources: list[Path], per_folder: int, out: Path) -> dict[str, list[tuple[str, str]]]:
    """Originals and their copies under out/CLASS/; returns kind -> [(original, copy)] as relative paths."""
    pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for folder in sources:
        files = image_files(folder)
        for n, path in enumerate(files[:: max(1, len(files) // per_folder)][:per_folder]):
            cls = f"{folder.name}-{path.parent.name}"
            (out / cls).mkdir(parents=True, exist_ok=True)
            picture = Image.open(path).convert("RGB")
            original = f"{cls}/{n:04d}.png"
            picture.save(out / original)
            for kind, (copy, fmt, options) in kinds_of_copy(picture).items():
                name = f"{cls}/{n:04d}-{kind}.{'png' if fmt == 'PNG' else 'jpg'}"
                buffer = io.BytesIO()
                copy.save(buffer, fmt, **options)
                (out / name).write_bytes(buffer.getvalue())
                pairs[kind].append((original, name))
    return pairs


def prepare(images: Path, out: Path, *extra: str) -> dict:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "prepare",
            str(images),
            "--out",
            str(out),
            "--augment",
            "0",
            "--no-cache",
            "-q",
            *extra,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads((out / "report.json").read_text())


def source_splits(out: Path) -> dict[str, str]:
    with open(out / "manifest.csv", newline="") as f:
        return {row["path"]: row["split"] for row in csv.DictReader(f) if row["augmented"] == "0"}


def measure_copies(sources: list[Path], per_folder: int, work: Path) -> None:
    images = work / "copies"
    shutil.rmtree(images, ignore_errors=True)
    pairs = write_copies(sources, per_folder, images)
    report = prepare(images, work / "copies-data")
    split = source_splits(work / "copies-data")
    group_of = {p: g for g, group in enumerate(report["near_duplicate_groups"]) for p in group["paths"]}
    removed_as = {r: d["kept"] for d in report["duplicates"] for r in d["removed"]}
    folders = [folder.name for folder in sources]
    print("copies kept with their original (same group / same split), prepare's defaults, by source folder:")
    print(f"{'kind':16s} " + " ".join(f"{name + ' (' + str(per_folder) + ')':>22s}" for name in folders))
    for kind, found in sorted(pairs.items()):
        cells = []
        for name in folders:
            together = same = count = 0
            for original, copy in found:
                if not original.startswith(name + "-"):
                    continue
                count += 1
                o, c = removed_as.get(original, original), removed_as.get(copy, copy)
                together += o == c or (group_of.get(c) is not None and group_of.get(c) == group_of.get(o))
                same += split.get(c) == split.get(o)
            cells.append(f"{together / max(count, 1):.3f} / {same / max(count, 1):.3f}")
        print(f"{kind:16s} " + " ".join(f"{cell:>22s}" for cell in cells))
    sizes = [len(g["paths"]) for g in report["near_duplicate_groups"]]
    print(f"largest group {max(sizes, default=1)}; groups {len(sizes)}; images {report['totals']['found']}")


def measure_lookalikes(folder: Path, seeds: list[int], work: Path) -> None:
    from sklearn.model_selection import StratifiedGroupKFold

    for seed in seeds:
        out = work / f"{folder.name}-{seed}"
        report = prepare(folder, out, "--seed", str(seed))
        split = source_splits(out)
        paths = sorted(split)
        label = {p: p.split("/", 1)[0] for p in paths}
        group_of = {p: g for g, group in enumerate(report["near_duplicate_groups"]) for p in group["paths"]}
        groups = np.array([group_of.get(p, len(group_of) + i) for i, p in enumerate(paths)])
        labels = np.array([label[p] for p in paths])
        ours = np.array([split[p] for p in paths])
        theirs = np.full(len(paths), "train", dtype=object)
        folds = StratifiedGroupKFold(n_splits=10, shuffle=True, random_state=seed)
        for fold, (_, held) in enumerate(folds.split(np.zeros(len(paths)), labels, groups)):
            if fold < 2:
                theirs[held] = "test"
            elif fold == 2:
                theirs[held] = "val"
        sizes = [len(g["paths"]) for g in report["near_duplicate_groups"]]
        line = (
            f"{folder.name} seed {seed}: largest group {max(sizes, default=1)}, {len(sizes)} groups, "
            f"{len(report['cross_class_near_copies'])} across classes"
        )
        for name, assigned in (("prepare", ours), ("StratifiedGroupKFold", theirs)):
            shares = {c: {s: np.mean(assigned[labels == c] == s) for s in ("test", "val")} for c in np.unique(labels)}
            test = [v["test"] for v in shares.values()]
            val = [v["val"] for v in shares.values()]
            off = max(max(abs(v["test"] - 0.2), abs(v["val"] - 0.1)) for v in shares.values())
            line += f"; {name}: test {min(test):.3f}-{max(test):.3f}, val {min(val):.3f}-{max(val):.3f}, worst {off * 100:.1f} points"
        print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies-from", nargs="*", type=Path, default=[])
    p.add_argument("--per-folder", type=int, default=100, help="pictures copied from each --copies-from folder")
    p.add_argument("--lookalikes", nargs="*", type=Path, default=[])
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    p.add_argument("--work", type=Path, default=Path("bench/work/near_copies"))
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.copies_from:
        measure_copies(a.copies_from, a.per_folder, a.work)
    for folder in a.lookalikes:
        measure_lookalikes(folder, a.seeds, a.work)


if __name__ == "__main__":
    main()
