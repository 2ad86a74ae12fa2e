"""prepare: a folder of class folders -> resized, de-duplicated, split, augmented arrays.

Reads IMAGES_DIR (never writes to it). Writes, atomically, into the output folder:
X_{train,val,test}.npy (uint8, N x size x size x channels), y_{train,val,test}.npy
(int64 labels), classes.json, manifest.csv (split,index,path,label,augmented: one row
per array row) and report.json (counts, skipped and ignored files, duplicates, settings).

Memory stays flat as the folder grows: workers write decoded rows straight into a buffer
file (`_decoded.npy`, in the temporary output folder), and rows move from there to the
outputs a bounded chunk at a time, by plain file reads and writes, so the pages stay in
the OS cache rather than in any process's resident memory.
"""

from __future__ import annotations

import csv
import hashlib
import math
import multiprocessing
import os
import signal
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline import __version__, augment, dedup, paths, progress
from pipeline.artifacts import atomic_dir, check_out_dir, load_array, read_json, write_json
from pipeline.errors import PipelineError
from pipeline.images import (
    FolderScan,
    UnreadableImage,
    channels,
    decode_image,
    scan_folder,
    to_array,
)
from pipeline.settings import PrepareSettings

DECODE_CHUNK = 32  # files per task a worker takes: few messages, and the last tasks still balance
COPY_BYTES = 16 * 2**20  # pixels moved per step from the decode buffer to the outputs


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def prepare_dataset(images_dir: Path, out_dir: Path, settings: PrepareSettings) -> dict:
    """Run the whole prepare stage; returns the report that is also written as report.json."""
    settings.check()
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    scan = scan_folder(images_dir)
    check_out_dir(out_dir, paths.PREPARE_REPORT_FILE, {"images folder": images_dir})
    if len(scan.class_names) < 2:
        raise PipelineError(
            f"{images_dir} has {len(scan.class_names)} class folder(s); a classifier needs at least 2 "
            "(one sub-folder of images per class)"
        )
    if not scan.files:
        raise PipelineError(f"no image files found under {images_dir}")
    workers = settings.workers or available_cores()
    with atomic_dir(out_dir) as tmp, _worker_pool(workers, len(scan.files), settings) as pool:
        buffer_path = tmp / "_decoded.npy"
        decoded = _decode_all(scan, settings, buffer_path, pool)
        report = _build_dataset(scan, decoded, settings, buffer_path, tmp, pool)
        buffer_path.unlink()
        _save_samples(tmp, report, settings)
    return report


class WorkerPool:
    """multiprocessing.Pool's ordered imap, or a plain map when one process is enough."""

    def __init__(self, processes: int):
        self.pool = None
        # One process per core already: BLAS threads (the hashes' matrix products) on top
        # of them only fought over the cores, doubling the CPU time. Forked workers inherit
        # the limit; it is lifted again on exit.
        self.blas_limit = threadpool_limits(1)
        if processes > 1:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            self.pool = context.Pool(processes, initializer=_quiet_worker)

    def imap(self, func, items, chunksize: int = 1):
        if self.pool is None:
            return map(func, items)
        return self.pool.imap(func, items, chunksize=chunksize)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        self.blas_limit.restore_original_limits()


def _quiet_worker() -> None:
    """Ctrl-C and kill are the parent's to handle: it stops the pool and cleans up, so a
    worker neither prints a KeyboardInterrupt traceback nor outlives it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _worker_pool(workers: int, n_files: int, settings: PrepareSettings) -> WorkerPool:
    if settings.augment:
        augment.build_augmenter(0)  # import albumentations once, before the workers fork
    return WorkerPool(min(workers, max(1, n_files // 16)))


@dataclass
class _Decoded:
    ok: np.ndarray  # bool per scanned file
    reasons: dict[int, str]  # why a file was skipped
    digests: list[bytes | None]
    phashes: np.ndarray  # uint64, 0 where not decoded


def _decode_file(path: str, size: int, color: str) -> tuple[np.ndarray | None, str | None, bytes | None, int]:
    """(row, skip reason, pixel digest, perceptual hash); the hash is 0 where the batch computes it."""
    try:
        image = decode_image(path, color, draft_size=size)
    except UnreadableImage as e:
        return None, str(e), None, 0
    except Exception as e:  # a decoder bug must not end the whole run: skip and say why
        return None, f"could not decode ({type(e).__name__}: {e})", None, 0
    array = to_array(image, size)
    # Exact duplicates are rows the model could not tell apart: identical pixels at --size.
    digest = hashlib.blake2b(array.data, digest_size=16).digest()
    # Near-duplicates are judged at the resolution the model sees (hashed for the whole
    # chunk at once), unless that is below the hash's own 32x32: then on the decoded image.
    phash = 0 if size >= dedup.PHASH_SIDE else dedup.perceptual_hash(image)
    return array, None, digest, phash


def _decode_chunk(args: tuple[str, int, int, list[str], int, str]) -> list[tuple[str | None, bytes | None, int]]:
    """Decode consecutive files into their rows of the buffer file; return (reason, digest, phash) each.

    The worker writes the pixels itself, so they never travel back through a pipe and the
    parent never holds them.
    """
    buffer_path, offset, start, files, size, color = args
    rows = np.zeros((len(files), size, size, channels(color)), dtype=np.uint8)
    results = []
    for i, path in enumerate(files):
        array, reason, digest, phash = _decode_file(path, size, color)
        if array is not None:
            rows[i] = array
        results.append((reason, digest, phash))
    write_rows(Path(buffer_path), offset, start, rows)
    if size >= dedup.PHASH_SIDE:
        decoded = [i for i, (reason, _, _) in enumerate(results) if reason is None]
        for i, phash in zip(decoded, dedup.perceptual_hashes(rows[decoded]).tolist()):
            results[i] = (None, results[i][1], phash)
    return results


def _decode_all(scan: FolderScan, s: PrepareSettings, buffer_path: Path, pool: WorkerPool) -> _Decoded:
    n = len(scan.files)
    offset = create_rows_file(buffer_path, (n, s.size, s.size, channels(s.color)))
    ok = np.zeros(n, dtype=bool)
    reasons: dict[int, str] = {}
    digests: list[bytes | None] = [None] * n
    phashes = np.zeros(n, dtype=np.uint64)
    tasks = [
        (str(buffer_path), offset, start, [str(scan.root / rel) for rel, _ in scan.files[start : start + DECODE_CHUNK]])
        + (s.size, s.color)
        for start in range(0, n, DECODE_CHUNK)
    ]
    done = pool.imap(_decode_chunk, tasks)
    i = 0
    for results in progress.track(done, len(tasks), f"decoding {n} images"):
        for reason, digest, phash in results:
            if reason is None:
                ok[i], digests[i], phashes[i] = True, digest, phash
            else:
                reasons[i] = reason
            i += 1
    return _Decoded(ok, reasons, digests, phashes)


def create_rows_file(path: Path, shape: tuple[int, ...]) -> int:
    """Create a zero-filled uint8 .npy of `shape` (sparse on disk); return where its rows start."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
        offset = f.tell()
        f.truncate(offset + math.prod(shape))
    return offset


def write_rows(path: Path, offset: int, start: int, rows: np.ndarray) -> None:
    """Write consecutive rows from `start` with plain file I/O: the pages go to the OS cache,
    not into this process's resident memory as a memory map's would."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    if rows.size:
        with open(path, "r+b") as f:
            f.seek(offset + start * (rows.size // len(rows)))
            f.write(rows.data)


def read_rows(path: Path, rows: np.ndarray) -> np.ndarray:
    """The given rows of a .npy, copied out of a memory map that is closed again at once."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    try:
        return np.asarray(array[rows])
    finally:
        del array


def _build_dataset(scan: FolderScan, decoded: _Decoded, s: PrepareSettings, buffer_path: Path, tmp: Path, pool) -> dict:
    files = scan.files
    skipped = [{"path": files[i][0], "reason": r} for i, r in sorted(decoded.reasons.items())]
    warnings = list(scan.warnings)

    rows = np.flatnonzero(decoded.ok)  # usable files, in scan order
    labels = np.array([files[i][1] for i in rows], dtype=np.int64)
    drop, duplicate_groups, conflict_groups = dedup.find_exact_duplicates(
        [decoded.digests[i] for i in rows], labels.tolist()
    )
    keep = np.ones(len(rows), dtype=bool)
    keep[drop] = False
    keep = np.flatnonzero(keep)  # (not np.setdiff1d: it imports numpy.ma, 30 ms)

    # Classes left without a usable image are dropped and the rest renumbered.
    found_per_class = np.bincount([label for _, label in files], minlength=len(scan.class_names))
    usable_per_class = np.bincount(labels[keep], minlength=len(scan.class_names))
    class_names = []
    for label, name in enumerate(scan.class_names):
        if usable_per_class[label] == 0:
            if found_per_class[label]:
                warnings.append(f"class folder '{name}' has no usable image and is left out")
        else:
            class_names.append(name)
    if len(class_names) < 2:
        raise PipelineError(f"only {len(class_names)} class(es) have usable images; a classifier needs at least 2")
    new_label = {scan.class_names.index(name): i for i, name in enumerate(class_names)}
    for group in conflict_groups:
        names = sorted({scan.class_names[labels[r]] for r in group})
        warnings.append(f"{len(group)} identical images sit in different classes ({', '.join(names)}): all left out")
    if s.strict and (skipped or warnings):
        problems = [f"{x['path']}: {x['reason']}" for x in skipped] + warnings
        raise PipelineError(f"--strict: {len(problems)} problem(s), nothing written; first: {problems[0]}")

    kept_rows = rows[keep]  # indices into the buffer / scan.files
    kept_labels = np.array([new_label[label] for label in labels[keep]], dtype=np.int64)
    groups = dedup.group_near_duplicates(decoded.phashes[kept_rows], s.near_duplicate_distance)
    split_of = split_by_group(kept_labels, groups, s.test_size, s.val_size, s.seed, class_names)

    row_shape = (s.size, s.size, channels(s.color))
    chunk_rows = max(1, COPY_BYTES // math.prod(row_shape))
    manifest: list[tuple[str, int, str, str, int]] = []
    counts = {
        name: {
            "found": 0,
            "skipped": 0,
            "duplicates": 0,
            "train": 0,
            "val": 0,
            "test": 0,
            "train_augmented": 0,
        }
        for name in class_names
    }
    for split in paths.SPLITS:
        members = np.flatnonzero(split_of == split)
        sources, split_labels = kept_rows[members], kept_labels[members]
        copies = s.augment if split == "train" else 0
        n_rows = len(members) * (1 + copies)
        X_path = tmp / paths.images_file(split)
        offset = create_rows_file(X_path, (n_rows, *row_shape))
        for start in range(0, len(members), chunk_rows):
            write_rows(X_path, offset, start, read_rows(buffer_path, sources[start : start + chunk_rows]))
        if copies:
            _write_augmented(X_path, offset, buffer_path, sources, copies, s.seed, s.flip, pool)
        y = np.tile(split_labels, 1 + copies)
        np.save(tmp / paths.labels_file(split), y)
        for index in range(n_rows):
            source = index % len(members) if len(members) else 0
            path = files[sources[source]][0]
            manifest.append((split, index, path, class_names[y[index]], int(index >= len(members))))
        for label in split_labels:
            counts[class_names[label]][split] += 1
        if copies:
            for label in split_labels:
                counts[class_names[label]]["train_augmented"] += copies

    for _, label in files:
        name = scan.class_names[label]
        if name in counts:
            counts[name]["found"] += 1
    for i in decoded.reasons:
        name = scan.class_names[files[i][1]]
        if name in counts:
            counts[name]["skipped"] += 1
    for group in duplicate_groups:
        counts[scan.class_names[labels[group[0]]]]["duplicates"] += len(group) - 1

    with open(tmp / paths.MANIFEST_FILE, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["split", "index", "path", "label", "augmented"])
        writer.writerows(manifest)
    write_json(tmp / paths.CLASSES_FILE, class_names)

    path_of = lambda r: files[rows[r]][0]  # noqa: E731  (row in `rows` -> relative path)
    near_groups = _near_duplicate_groups(groups, [files[r][0] for r in kept_rows], split_of)
    report = {
        "version": __version__,
        "images_dir": str(scan.root.resolve()),
        "classes": class_names,
        "counts": counts,
        "totals": {
            "found": len(files),
            "skipped": len(skipped),
            "ignored": len(scan.ignored),
            "duplicates_removed": sum(len(g) - 1 for g in duplicate_groups),
            "label_conflicts_removed": sum(len(g) for g in conflict_groups),
            **{split: int((split_of == split).sum()) for split in paths.SPLITS},
            "train_rows": int((split_of == "train").sum()) * (1 + s.augment),
        },
        "skipped": skipped,
        "ignored": {"counts": dict(Counter(item["reason"] for item in scan.ignored)), "items": scan.ignored},
        "duplicates": [{"kept": path_of(g[0]), "removed": [path_of(r) for r in g[1:]]} for g in duplicate_groups],
        "label_conflicts": [
            {
                "paths": [path_of(r) for r in g],
                "classes": sorted({scan.class_names[labels[r]] for r in g}),
            }
            for g in conflict_groups
        ],
        "near_duplicate_groups": near_groups,
        "warnings": warnings,
        "settings": asdict(s),
    }
    write_json(tmp / paths.PREPARE_REPORT_FILE, report)
    return report


def _save_samples(tmp: Path, report: dict, s: PrepareSettings) -> None:
    from pipeline import plots

    X = np.load(tmp / paths.images_file("train"), mmap_mode="r", allow_pickle=False)
    y = np.load(tmp / paths.labels_file("train"), allow_pickle=False)
    plots.save_samples(X, y, report["totals"]["train"], s.augment, report["classes"], tmp / paths.SAMPLES_PNG)


def _write_augmented(
    X_path: Path, offset: int, buffer_path: Path, sources: np.ndarray, copies: int, seed: int, flip: bool, pool
) -> None:
    n = len(sources)
    chunks = [
        (str(buffer_path), sources[start : start + augment.CHUNK_ROWS], copies, seed, k, flip)
        for k, start in enumerate(range(0, n, augment.CHUNK_ROWS))
    ]
    results = pool.imap(_augment_task, chunks)
    for (_, _, _, _, k, _), out in zip(chunks, progress.track(results, len(chunks), "augmenting training images")):
        start = k * augment.CHUNK_ROWS
        for c in range(copies):
            write_rows(X_path, offset, n * (1 + c) + start, out[c])


def _augment_task(args) -> np.ndarray:
    buffer_path, sources, copies, seed, chunk, flip = args
    return augment.augment_chunk(read_rows(Path(buffer_path), sources), copies, seed, chunk, flip)


def split_by_group(
    labels: np.ndarray,
    groups: np.ndarray,
    test_size: float,
    val_size: float,
    seed: int,
    class_names: list[str],
) -> np.ndarray:
    """Stratified train/val/test split that never puts one group in two splits.

    scikit-learn has group-aware splitters (GroupShuffleSplit, StratifiedGroupKFold) but
    none that is stratified, grouped and takes fractions, hence this: per class, shuffle
    its groups with the seed and fill test, then val, then train, by image count, never
    overshooting a split's share by more than it would fall short without the group.
    """
    rng = np.random.default_rng(seed)
    group_ids, first = np.unique(groups, return_index=True)
    group_size = np.bincount(groups)
    group_label = labels[first]  # a group belongs to the class of its first image
    group_split = np.full(len(group_ids), "train", dtype=object)
    for label, name in enumerate(class_names):
        class_groups = rng.permutation(group_ids[group_label == label])
        total = int(group_size[class_groups].sum())
        wanted = {
            "test": max(1, round(total * test_size)),
            "val": max(1, round(total * val_size)) if val_size > 0 else 0,
        }
        if total - wanted["test"] - wanted["val"] < 1:
            needed = 3 if val_size > 0 else 2
            raise PipelineError(
                f"class '{name}' has {total} usable image(s) (after duplicates); splitting into "
                f"{'train, val and test' if val_size > 0 else 'train and test'} needs at least {needed} per class: "
                "add images or lower --test-size/--val-size"
            )
        taken = {"test": 0, "val": 0}
        for g in class_groups:
            size = int(group_size[g])
            # A group joins test (then val) only if that lands nearer the wanted count than
            # leaving it out: one big near-duplicate group must not swell the test split.
            split = next((s for s in ("test", "val") if size - (wanted[s] - taken[s]) < wanted[s] - taken[s]), "train")
            if split != "train":
                taken[split] += size
            group_split[g] = split
        for split in ("test", "val"):  # every group too big: the smallest still goes, if train keeps one
            in_train = [g for g in class_groups if group_split[g] == "train"]
            if wanted[split] and not taken[split] and len(in_train) > 1:
                g = min(in_train, key=lambda g: group_size[g])
                group_split[g], taken[split] = split, int(group_size[g])
        if not np.any(group_split[class_groups] == "train"):
            raise PipelineError(
                f"class '{name}': its near-duplicate groups leave no image for training; add distinct images"
            )
    return group_split[groups]


def _near_duplicate_groups(groups: np.ndarray, group_paths: list[str], split_of: np.ndarray) -> list[dict]:
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    found = []
    for members in np.split(order, bounds):
        if len(members) > 1:
            found.append({"paths": [group_paths[m] for m in members], "split": str(split_of[members[0]])})
    return found


def load_classes(folder: Path, missing_hint: str) -> list[str]:
    classes = read_json(Path(folder) / paths.CLASSES_FILE, missing_hint)
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise PipelineError(f"{Path(folder) / paths.CLASSES_FILE} must be a list of at least 2 class names")
    return classes


def load_split(data_dir: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One split as prepare wrote it (memory-mapped, no pickle), checked for consistency."""
    hint = "run `pipeline prepare IMAGES_DIR` first"
    X = load_array(Path(data_dir) / paths.images_file(split), hint)
    y = np.asarray(load_array(Path(data_dir) / paths.labels_file(split), hint))
    if X.dtype != np.uint8 or X.ndim != 4 or X.shape[1] != X.shape[2] or X.shape[3] not in (1, 3):
        raise PipelineError(
            f"{data_dir}/{paths.images_file(split)} is not a prepared image array (uint8 N x size x size x 1|3), got {X.dtype} {X.shape}"
        )
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(X):
        raise PipelineError(
            f"{data_dir}/{paths.labels_file(split)} does not match {paths.images_file(split)} ({len(y)} labels for {len(X)} images)"
        )
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise PipelineError(
            f"{data_dir}/{paths.labels_file(split)} has labels outside the {num_classes} classes of classes.json"
        )
    return X, y.astype(np.int64)


IMBALANCE_RATIO = 3.0  # largest/smallest class above this gets a warning


def class_imbalance(sizes: dict[str, int], ratio: float = IMBALANCE_RATIO) -> str | None:
    """A warning naming the classes when the largest has more than `ratio` times the smallest's images."""
    if len(sizes) < 2:
        return None
    largest = max(sizes, key=sizes.get)
    smallest = min(sizes, key=sizes.get)
    if sizes[smallest] * ratio >= sizes[largest]:
        return None
    small = sorted((n for n in sizes if sizes[n] * ratio < sizes[largest]), key=sizes.get)
    listed = ", ".join(f"'{n}' ({sizes[n]})" for n in small[:10]) + (
        f" and {len(small) - 10} more" if len(small) > 10 else ""
    )
    shown = "inf" if sizes[smallest] == 0 else f"{sizes[largest] / sizes[smallest]:.1f}"
    return (
        f"classes are imbalanced: the largest, '{largest}', has {sizes[largest]} images, {shown}x the smallest; "
        f"under a third of it: {listed}. Accuracy will favour the large classes: add images to the small ones "
        "or read per-class recall"
    )


def usable_counts(report: dict) -> dict[str, int]:
    """Per class, the distinct usable source images (train + val + test, before augmentation)."""
    return {name: c["train"] + c["val"] + c["test"] for name, c in report["counts"].items()}
