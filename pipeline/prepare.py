"""prepare: a folder of class folders -> resized, de-duplicated, split, augmented arrays.

Reads IMAGES_DIR (never writes to it). Writes, atomically, into the output folder:
X_{train,val,test}.npy (uint8, N x size x size x channels), y_{train,val,test}.npy
(int64 labels), classes.json, manifest.csv (split,index,path,label,augmented: one row
per array row), health.csv (each source image's image properties, measured as it was
decoded: `data.health`), report.json (counts, skipped and ignored files, duplicates,
warnings, the --fixes applied, settings) and samples.png.

With --fixes (an audit.csv), the files it names are relabelled or left out of the scan
before anything is decoded (`data.fixes`); the images folder is never written to.

The steps, in `prepare_dataset`'s order: scan the folder; decode every file in worker
processes, local or a Dask cluster's (`data.decoding.decode_all`, through
`worker_pool.open_pool`); choose the source images (`choose_sources`: exact duplicates,
label conflicts, empty classes, warnings, --strict); split them (`splits.split_by_group`
on near-duplicate groups); write the arrays and manifest (`write_splits`); write the
report (`build_report`). Files decoded before, at the same settings, come from the per-file
cache (data/cache.py: .cache beside --out, --cache DIR, --no-cache), byte for byte as a
fresh decode would give them.

Memory stays flat as the folder grows: workers write decoded rows straight into a buffer
file (`_decoded.npy`, in the temporary output folder), and rows move from there to the
outputs a bounded chunk per worker task, by plain file reads and writes, so the pages stay
in the OS cache rather than in any process's resident memory. This process holds digests,
hashes, labels and paths only; on a cluster, it is the only part that is not distributed.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.core import paths, progress
from pipeline.core.artifacts import atomic_dir, check_out_dir, write_json
from pipeline.core.errors import PipelineError
from pipeline.core.settings import PrepareSettings
from pipeline.data import augment, cache, cache_index, dedup
from pipeline.data.cache import CacheCounts, EntryStore
from pipeline.data.cache_index import CacheRun
from pipeline.data.data_folder import (
    create_rows_file,
    read_rows,
    write_classes,
    write_health,
    write_manifest,
    write_rows,
)
from pipeline.data.decoding import Decoded, decode_all
from pipeline.data.fixes import apply_fixes, read_fixes
from pipeline.data.image_folder import FolderScan, class_imbalance, scan_folder
from pipeline.data.images import channels
from pipeline.data.splits import SplitPlan, across_classes, plan_split
from pipeline.data.worker_pool import available_cores, open_pool

COPY_BYTES = 16 * 2**20  # pixels moved per step from the decode buffer to the outputs


def prepare_dataset(images_dir: Path, out_dir: Path, settings: PrepareSettings) -> dict:
    """Run the whole prepare stage; returns the report that is also written as report.json."""
    settings.check()
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    scan = scan_folder(images_dir)
    fixes_applied = None
    if settings.fixes:
        scan, fixes_applied = apply_fixes(scan, read_fixes(Path(settings.fixes), scan))
    check_out_dir(out_dir, {"images folder": images_dir})
    if len(scan.class_names) < 2:
        raise PipelineError(
            f"{images_dir} has {len(scan.class_names)} class folder(s); a classifier needs at least 2 "
            "(one sub-folder of images per class)"
        )
    if not scan.files:
        raise PipelineError(f"no image files found under {images_dir}")
    cache_dir = cache.cache_dir_for(settings.cache, settings.no_cache, out_dir, images_dir)
    workers = settings.workers or available_cores()
    run = cache_index.start_run(cache_dir) if cache_dir else None
    try:
        with atomic_dir(out_dir) as tmp, _worker_pool(workers, len(scan.files), settings, run) as pool:
            pool.check_storage(scan.root / scan.files[0][0], tmp)  # a cluster's workers must see both
            buffer_path = tmp / "_decoded.npy"
            decoded = decode_all(scan, settings, buffer_path, pool, run)
            sources = choose_sources(scan, decoded, settings)
            plan = plan_split(
                sources.labels,
                sources.class_names,
                [scan.files[r][0] for r in sources.rows],
                decoded.phashes[sources.rows],
                lambda rows: dedup.copy_thumbnails(read_rows(buffer_path, sources.rows[rows])),
                settings,
            )
            sources.warnings.extend(plan.warnings)
            if settings.strict:
                _strict(plan.warnings)
            counts = write_splits(scan, sources, plan.split_of, settings, buffer_path, tmp, pool, decoded, run)
            write_health(tmp / paths.HEALTH_FILE, scan, sources, plan.split_of, decoded.health)
            report = build_report(scan, decoded, sources, plan, counts, settings)
            if fixes_applied is not None:
                report["fixes"] = fixes_applied
            write_json(tmp / paths.PREPARE_REPORT_FILE, report)
            buffer_path.unlink()
            _save_samples(tmp, report, settings)
    finally:
        if run is not None:  # once per run, a failed one too: the entries its workers wrote serve the next
            cache_index.finish_run(run, int(settings.cache_limit_gb * 2**30))
    if decoded.cache is not None:  # after the run, so that an error stays the one line it ends with
        progress.say(cache.note(decoded.cache, cache_dir, len(scan.files)))
    return report


def _worker_pool(workers: int, n_files: int, settings: PrepareSettings, run: CacheRun | None):
    if settings.augment and not settings.scheduler and (run is None or len(run.index) < n_files):
        # Import albumentations once, before the workers fork, where copies will be drawn:
        # without a cache, or with one that holds fewer entries than the folder has files
        # (it has not seen most of it). A cache that may serve every copy leaves the import
        # to the first worker that draws one: nobody, in a re-run (a second, a third of it).
        augment.build_augmenter(0)
    return open_pool(min(workers, max(1, n_files // 16)), settings.scheduler)


# --- choosing the source images: duplicates, conflicts, empty classes, warnings ----------


@dataclass
class Sources:
    """The decoded images that go into the split, and what was left out on the way."""

    usable: np.ndarray  # indices into scan.files of every decoded file, in scan order
    usable_labels: np.ndarray  # their class indices in scan.class_names
    rows: np.ndarray  # the kept ones: indices into scan.files and the buffer file
    labels: np.ndarray  # their labels, renumbered over class_names
    class_names: list[str]  # classes with at least one kept image
    duplicate_groups: list[list[int]]  # positions in `usable`; the first of each is kept
    conflict_groups: list[list[int]]  # positions in `usable`; identical images in several classes
    skipped: list[dict]
    warnings: list[str]


def choose_sources(scan: FolderScan, decoded: Decoded, s: PrepareSettings) -> Sources:
    """Drop exact duplicates and label conflicts, leave out classes with no usable image,
    collect every warning (the one list report.json, the CLI, report.html and --strict read)."""
    files = scan.files
    skipped = [{"path": files[i][0], "reason": r} for i, r in sorted(decoded.reasons.items())]
    warnings = list(scan.warnings)

    usable = np.flatnonzero(decoded.ok)
    labels = np.array([files[i][1] for i in usable], dtype=np.int64)
    drop, duplicate_groups, conflict_groups = dedup.find_exact_duplicates(
        [decoded.digests[i] for i in usable], labels.tolist()
    )
    keep = np.ones(len(usable), dtype=bool)
    keep[drop] = False
    keep = np.flatnonzero(keep)  # (not np.setdiff1d: it imports numpy.ma, 30 ms)

    # Classes left without a usable image are dropped and the rest renumbered.
    found_per_class = np.bincount([label for _, label in files], minlength=len(scan.class_names))
    kept_per_class = np.bincount(labels[keep], minlength=len(scan.class_names))
    class_names = []
    for label, name in enumerate(scan.class_names):
        if kept_per_class[label] == 0:
            if found_per_class[label]:
                warnings.append(f"class folder '{name}' has no usable image and is left out")
        else:
            class_names.append(name)
    if len(class_names) < 2:
        raise PipelineError(f"only {len(class_names)} class(es) have usable images; a classifier needs at least 2")
    for group in conflict_groups:
        names = sorted({scan.class_names[labels[r]] for r in group})
        warnings.append(f"{len(group)} identical images sit in different classes ({', '.join(names)}): all left out")
    imbalance = class_imbalance(
        {scan.class_names[label]: int(kept_per_class[label]) for label in range(len(scan.class_names))}
    )
    if imbalance:
        warnings.append(imbalance)
    if s.strict:
        _strict([f"{x['path']}: {x['reason']}" for x in skipped] + warnings)

    new_label = {scan.class_names.index(name): i for i, name in enumerate(class_names)}
    return Sources(
        usable=usable,
        usable_labels=labels,
        rows=usable[keep],
        labels=np.array([new_label[label] for label in labels[keep]], dtype=np.int64),
        class_names=class_names,
        duplicate_groups=duplicate_groups,
        conflict_groups=conflict_groups,
        skipped=skipped,
        warnings=warnings,
    )


def _strict(problems: list[str]) -> None:
    if problems:
        raise PipelineError(f"--strict: {len(problems)} problem(s), nothing written; first: {problems[0]}")


# --- writing the splits: arrays, augmented copies, manifest, classes --------------------


def write_splits(
    scan: FolderScan,
    sources: Sources,
    split_of: np.ndarray,
    s: PrepareSettings,
    buffer_path: Path,
    tmp: Path,
    pool,
    decoded: Decoded,
    run: CacheRun | None = None,
) -> dict[str, dict[str, int]]:
    """Write X/y for each split (augmented copies after the originals, train only), the
    manifest and classes.json; return the per-class counts. With a cache `run`, what it
    served of the augmented copies is added to `decoded.cache`."""
    class_names = sources.class_names
    row_shape = (s.size, s.size, channels(s.color))
    chunk_rows = max(1, COPY_BYTES // math.prod(row_shape))
    manifest: list[tuple[str, int, str, str, int]] = []
    counts = {name: dict.fromkeys(paths.COUNT_COLUMNS, 0) for name in class_names}
    for split in paths.SPLITS:
        members = np.flatnonzero(split_of == split)
        split_sources, split_labels = sources.rows[members], sources.labels[members]
        copies = s.augment if split == "train" else 0
        n_rows = len(members) * (1 + copies)
        X_path = tmp / paths.images_file(split)
        offset = create_rows_file(X_path, (n_rows, *row_shape))
        # The rows move in the workers too, a bounded chunk per task: on a cluster, through
        # the shared storage's many clients rather than this one process.
        moves = [
            (os.path.abspath(buffer_path), split_sources[start : start + chunk_rows], os.path.abspath(X_path), offset)
            + (start,)
            for start in range(0, len(members), chunk_rows)
        ]
        for _ in pool.imap(_copy_task, moves):
            pass
        if copies:
            source_digests = [decoded.digests[row] for row in split_sources]
            _write_augmented(
                X_path, offset, buffer_path, split_sources, source_digests, copies, s, pool, run, decoded.cache
            )
        y = np.tile(split_labels, 1 + copies)
        np.save(tmp / paths.labels_file(split), y)
        for index in range(n_rows):
            source = index % len(members) if len(members) else 0
            path = scan.files[split_sources[source]][0]
            manifest.append((split, index, path, class_names[y[index]], int(index >= len(members))))
        for label in split_labels:
            counts[class_names[label]][split] += 1
            counts[class_names[label]]["train_augmented"] += copies
    write_manifest(tmp / paths.MANIFEST_FILE, manifest)
    write_classes(tmp, class_names)
    return counts


def _copy_task(args) -> None:
    """Copy some rows of the decode buffer into consecutive rows of an output array."""
    buffer_path, sources, X_path, offset, start = args
    write_rows(Path(X_path), offset, start, read_rows(Path(buffer_path), sources))


def _write_augmented(
    X_path: Path,
    offset: int,
    buffer_path: Path,
    sources: np.ndarray,
    digests: list[bytes],
    copies: int,
    s: PrepareSettings,
    pool,
    run: CacheRun | None,
    cache_counts: CacheCounts | None,
) -> None:
    """The augmented copies into X_train after its originals; with a cache `run`, each
    source image's copies are looked up by its pixels and the settings, the entries
    written are added to `run.new` and what was served to `cache_counts`."""
    n = len(sources)
    chunks = [
        (
            os.path.abspath(buffer_path),
            sources[start : start + augment.CHUNK_ROWS],
            digests[start : start + augment.CHUNK_ROWS],
        )
        + (copies, s.seed, s.flip, os.path.abspath(X_path), offset, n, start, os.path.abspath(run.root) if run else "")
        for start in range(0, n, augment.CHUNK_ROWS)
    ]
    for counts, written in progress.track(pool.imap(_augment_task, chunks), len(chunks), "augmenting training images"):
        if run is not None:
            cache_counts.add(counts)
            run.new.extend(written)


def _augment_task(args) -> tuple[CacheCounts, list]:
    """Augment some source rows and write each copy into its rows of X_train: the worker
    writes them itself, as decoding does, so they never travel back to the parent. Returns
    what the cache served and the entries it wrote."""
    buffer_path, sources, digests, copies, seed, flip, X_path, offset, n, start, cache_dir = args
    store, counts = (EntryStore(cache_dir) if cache_dir else None), CacheCounts()
    buffer = np.load(buffer_path, mmap_mode="r", allow_pickle=False)  # a re-run's copies need no source row
    try:
        out = augment.augment_images(buffer, sources, digests, copies, seed, flip, store, counts)
    finally:
        del buffer
    for c in range(copies):
        write_rows(Path(X_path), offset, n * (1 + c) + start, out[c])
    return counts, (store.flush() if store is not None else [])


# --- the report ------------------------------------------------------------------------


def build_report(
    scan: FolderScan,
    decoded: Decoded,
    sources: Sources,
    plan: SplitPlan,
    counts: dict[str, dict[str, int]],
    s: PrepareSettings,
) -> dict:
    """report.json: what was found, skipped, ignored, removed and split, every warning, the settings."""
    files, class_of = scan.files, scan.class_names
    for _, label in files:
        if class_of[label] in counts:
            counts[class_of[label]]["found"] += 1
    for i in decoded.reasons:
        if class_of[files[i][1]] in counts:
            counts[class_of[files[i][1]]]["skipped"] += 1
    for group in sources.duplicate_groups:
        counts[class_of[sources.usable_labels[group[0]]]]["duplicates"] += len(group) - 1

    path_of = lambda r: files[sources.usable[r]][0]  # noqa: E731  (position in `usable` -> relative path)
    return {
        "version": __version__,
        "images_dir": str(scan.root.resolve()),
        "classes": sources.class_names,
        "counts": counts,
        "totals": {
            "found": len(files),
            "skipped": len(sources.skipped),
            "ignored": len(scan.ignored),
            "duplicates_removed": sum(len(g) - 1 for g in sources.duplicate_groups),
            "label_conflicts_removed": sum(len(g) for g in sources.conflict_groups),
            **{split: int((plan.split_of == split).sum()) for split in paths.SPLITS},
            "train_rows": int((plan.split_of == "train").sum()) * (1 + s.augment),
        },
        "skipped": sources.skipped,
        "ignored": {"counts": dict(Counter(item["reason"] for item in scan.ignored)), "items": scan.ignored},
        "links_out": scan.links_out,  # read through symbolic links that leave the images folder
        "duplicates": [
            {"kept": path_of(g[0]), "removed": [path_of(r) for r in g[1:]]} for g in sources.duplicate_groups
        ],
        "label_conflicts": [
            {
                "paths": [path_of(r) for r in g],
                "classes": sorted({class_of[sources.usable_labels[r]] for r in g}),
                "class_of": [class_of[sources.usable_labels[r]] for r in g],  # after --fixes, not the folder's
            }
            for g in sources.conflict_groups
        ],
        "split_shares": plan.shares,
        "near_duplicate_groups": plan.near,
        "cross_class_near_copies": across_classes(plan.near),
        "warnings": sources.warnings,
        "settings": recorded_settings(s),
        **cache.report_section(decoded.cache),
    }


def recorded_settings(s: PrepareSettings) -> dict:
    """The settings that shape the output; where the work ran (the scheduler) and the cache
    do not, so a cluster run's or a cached run's report is byte-identical to a local run's."""
    return {k: v for k, v in asdict(s).items() if k not in ("scheduler", "cache", "no_cache", "cache_limit_gb")}


def _save_samples(tmp: Path, report: dict, s: PrepareSettings) -> None:
    from pipeline.report import plots

    X = np.load(tmp / paths.images_file("train"), mmap_mode="r", allow_pickle=False)
    y = np.load(tmp / paths.labels_file("train"), allow_pickle=False)
    plots.save_samples(X, y, report["totals"]["train"], s.augment, report["classes"], tmp / paths.SAMPLES_PNG)
