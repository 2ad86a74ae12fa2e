"""inspect: what prepare would find in IMAGES_DIR, without writing anything anywhere.

Reads IMAGES_DIR with the same scan and the same decoder as prepare (every candidate is
decoded for real), and returns classes, counts, file formats and pixel modes, the spread
of image sizes, and which files would be skipped or ignored and why. Writes nothing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core import progress
from pipeline.core.settings import InspectSettings
from pipeline.data.image_folder import class_imbalance, scan_folder
from pipeline.data.images import UnreadableImage, decode_image
from pipeline.data.worker_pool import WorkerPool, available_cores

POOL_FROM = 64  # files; below this a pool costs more than it saves
DRAFT = 256  # JPEGs decode at a reduced scale: enough to prove the data is whole, much faster
ORIENTATION = 0x0112  # EXIF tag


def inspect_folder(images_dir: Path, settings: InspectSettings | None = None) -> dict:
    """What prepare would find, as a dict (the CLI prints it, or --json dumps it)."""
    settings = settings or InspectSettings()
    settings.check()
    images_dir = Path(images_dir)
    scan = scan_folder(images_dir)
    paths = [str(scan.root / rel) for rel, _ in scan.files]
    looks = _look_at_all(paths, settings.workers)

    classes = {
        name: {"files": 0, "usable": 0, "skipped": 0, "formats": Counter(), "modes": Counter()}
        for name in scan.class_names
    }
    skipped, widths, heights = [], [], []
    for (rel, label), (fmt, mode, size, reason) in zip(scan.files, looks):
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
        "skipped": skipped,
        "ignored": scan.ignored,
        "warnings": warnings,
    }


def _spread(values: list[int]) -> dict | None:
    if not values:
        return None
    return {"min": int(min(values)), "median": float(np.median(values)), "max": int(max(values))}


def _look(path: str) -> tuple[str | None, str | None, tuple[int, int] | None, str | None]:
    """(format, mode, (width, height) upright, reason it would be skipped or None)."""
    fmt = mode = size = None
    try:
        with Image.open(path) as image:
            fmt, mode, size = image.format, image.mode, image.size
            if image.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8):  # stored sideways: prepare turns it upright
                size = size[::-1]
    except Exception:
        pass  # decode_image below says why, in the words prepare uses
    try:
        decode_image(Path(path), "rgb", draft_size=DRAFT)  # for real: a truncated file fails here, not at open
    except UnreadableImage as e:
        return fmt, mode, None, str(e)
    except Exception as e:
        return fmt, mode, None, f"could not decode ({type(e).__name__}: {e})"
    return fmt, mode, size, None


def _look_at_all(paths: list[str], workers: int):
    processes = min(workers or available_cores(), max(1, len(paths) // POOL_FROM))
    with WorkerPool(processes) as pool:
        return list(progress.track(pool.imap(_look, paths, chunksize=16), len(paths), "decoding images"))
