"""inspect: what prepare would find in IMAGES_DIR, without writing anything anywhere.

Reads IMAGES_DIR with the same scan and the same decoder as prepare (every candidate is
decoded for real, at prepare's default size), and returns classes, counts, file formats and
pixel modes, the spread of image sizes, which files would be skipped or ignored and why,
and how prepare would split each class at its defaults (the same duplicates, near-copy
groups and split: `data.splits.plan_split`). Writes nothing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.core import progress
from pipeline.core.errors import PipelineError
from pipeline.core.settings import BACKBONE_SIZES, CNN, InspectSettings, PrepareSettings
from pipeline.data import dedup
from pipeline.data.decoding import decode_one
from pipeline.data.image_folder import FolderScan, class_imbalance, scan_folder
from pipeline.data.images import UnreadableImage, open_image, read_image_file
from pipeline.data.worker_pool import WorkerPool, available_cores

POOL_FROM = 64  # files; below this a pool costs more than it saves
PREPARE = PrepareSettings()  # inspect says what prepare would do at its defaults
ORIENTATION = 0x0112  # EXIF tag


def inspect_folder(images_dir: Path, settings: InspectSettings | None = None) -> dict:
    """What prepare would find, as a dict (the CLI prints it, or --json dumps it)."""
    settings = settings or InspectSettings()
    settings.check()
    images_dir = Path(images_dir)
    scan = scan_folder(images_dir)
    paths = [str(scan.root / rel) for rel, _ in scan.files]
    looks = _look_at_all(paths, settings.workers)
    shares, split_warnings = _split_at_the_defaults(scan, looks)

    classes = {
        name: {"files": 0, "usable": 0, "skipped": 0, "formats": Counter(), "modes": Counter()}
        for name in scan.class_names
    }
    skipped, widths, heights = [], [], []
    for (rel, label), (fmt, mode, size, reason, *_) in zip(scan.files, looks):
        c = classes[scan.class_names[label]]
        c["files"] += 1
        if fmt:
            c["formats"][fmt] += 1
            c["modes"][mode] += 1
        if reason:
            c["skipped"] += 1
            skipped.append({"path": rel, "reason": reason})
        else:
            c["usable"] += 1
            widths.append(size[0])
            heights.append(size[1])
    warnings = list(scan.warnings)
    warnings += [
        f"class folder '{n}' has no usable image" for n, c in classes.items() if c["files"] and not c["usable"]
    ]
    if len(scan.class_names) < 2:
        warnings.append(f"{len(scan.class_names)} class folder(s): a classifier needs at least 2")
    imbalance = class_imbalance({n: c["usable"] for n, c in classes.items()})
    if imbalance:
        warnings.append(imbalance)
    warnings += split_warnings
    formats, modes = Counter(), Counter()
    for c in classes.values():
        formats.update(c["formats"])
        modes.update(c["modes"])
        c["formats"], c["modes"] = dict(sorted(c["formats"].items())), dict(sorted(c["modes"].items()))
    return {
        "images_dir": str(scan.root.resolve()),
        "classes": scan.class_names,
        "counts": classes,
        "totals": {
            "files": len(scan.files),
            "usable": len(scan.files) - len(skipped),
            "skipped": len(skipped),
            "ignored": len(scan.ignored),
        },
        "formats": dict(sorted(formats.items())),
        "modes": dict(sorted(modes.items())),
        "sizes": {"width": _spread(widths), "height": _spread(heights)},
        "size_wanted": {CNN: 32, **BACKBONE_SIZES},  # prepare --size for each network of train --backbone
        "skipped": skipped,
        "ignored": scan.ignored,
        "split_shares": shares,
        "links_out": scan.links_out,
        "warnings": warnings,
    }


def _split_at_the_defaults(scan: FolderScan, looks: list[tuple]) -> tuple[dict | None, list[str]]:
    """What prepare at its defaults would make of each class's split, and its warnings about
    it; (None, [why not]) where prepare would stop first."""
    from pipeline.data.decoding import Decoded
    from pipeline.data.splits import plan_split
    from pipeline.prepare import choose_sources

    ok = np.array([look[3] is None for look in looks], dtype=bool)
    reasons = {i: look[3] for i, look in enumerate(looks) if look[3] is not None}
    decoded = Decoded(ok, reasons, [look[4] for look in looks], np.array([look[5] for look in looks], np.uint64), [])
    thumbnails = [look[6] for look in looks]
    try:
        sources = choose_sources(scan, decoded, PREPARE)
        rows = sources.rows
        plan = plan_split(
            sources.labels,
            sources.class_names,
            [scan.files[r][0] for r in rows],
            decoded.phashes[rows],
            lambda chosen: np.stack([thumbnails[r] for r in rows[chosen]]).astype(np.float32),
            PREPARE,
        )
    except PipelineError as e:
        return None, [f"prepare would stop: {e}"]
    return plan.shares, plan.warnings


def _spread(values: list[int]) -> dict | None:
    if not values:
        return None
    return {"min": int(min(values)), "median": float(np.median(values)), "max": int(max(values))}


def _look(path: str) -> tuple:
    """(format, mode, (width, height) upright, reason it would be skipped or None, and as
    prepare would see the file at its defaults: pixel digest, perceptual hash and the grey
    thumbnail near copies are confirmed on, as uint8)."""
    fmt = mode = size = None
    try:
        data = read_image_file(path)[1]  # once: a FIFO or a device is refused here, never opened
    except UnreadableImage as e:
        return fmt, mode, None, str(e), None, 0, None
    try:
        with open_image(data) as image:
            fmt, mode, size = image.format, image.mode, image.size
            if image.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8):  # stored sideways: prepare turns it upright
                size = size[::-1]
    except Exception:
        pass  # decode_one below says why, in the words prepare uses
    row, reason, digest, phash = decode_one(data, PREPARE.size, PREPARE.color)  # for real, as prepare does
    if reason is not None:
        return fmt, mode, None, reason, None, 0, None
    thumbnail = dedup.copy_thumbnails(row[None])[0].astype(np.uint8)  # whole grey levels: exact as uint8
    return fmt, mode, size, None, digest, phash, thumbnail


def _look_at_all(paths: list[str], workers: int):
    processes = min(workers or available_cores(), max(1, len(paths) // POOL_FROM))
    with WorkerPool(processes) as pool:
        return list(progress.track(pool.imap(_look, paths, chunksize=16), len(paths), "decoding images"))
