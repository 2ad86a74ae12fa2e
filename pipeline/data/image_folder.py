"""The user's images folder: which sub-folders are classes, which files are their images.

`scan_folder` reads IMAGES_DIR (sub-folder = class) and says what it ignored and why;
`collect_images` expands the files and folders given to predict; `class_imbalance` is
the warning prepare and inspect give about the class counts they found. Nothing here
writes to the user's folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.settings import IMBALANCE_RATIO

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})
METADATA_DIRS = frozenset({"__MACOSX"})


@dataclass
class FolderScan:
    root: Path
    class_names: list[str]
    files: list[tuple[str, int]]  # (path relative to root, class index), sorted
    ignored: list[dict] = field(default_factory=list)  # {"path", "reason"}
    warnings: list[str] = field(default_factory=list)


def _ignore_reason(name: str, is_dir: bool) -> str | None:
    if name.startswith("._"):
        return "macOS resource fork (._ file)"
    if name.startswith("."):
        return "hidden folder" if is_dir else "hidden file"
    if is_dir and name in METADATA_DIRS:
        return "macOS metadata folder (__MACOSX)"
    if not is_dir and name.lower() in SYSTEM_FILES:
        return "system file"
    return None


def scan_folder(root: Path) -> FolderScan:
    """List class folders and their image files; never follows a symbolic-link loop."""
    root = Path(root)
    if not root.exists():
        raise PipelineError(f"images folder {root} does not exist")
    if not root.is_dir():
        raise PipelineError(f"{root} is not a folder: give a folder with one sub-folder per class")
    ignored: list[dict] = []
    class_dirs: list[Path] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        is_dir = entry.is_dir()
        reason = _ignore_reason(entry.name, is_dir)
        if reason is None and not is_dir:
            reason = "file directly in the images folder (classes are sub-folders)"
        if reason:
            ignored.append({"path": entry.name, "reason": reason})
        else:
            class_dirs.append(entry)
    files: list[tuple[str, int]] = []
    warnings_: list[str] = []
    # Every folder is read once: a link back to the images folder, to another class folder
    # or to a folder already walked (a loop) is listed as ignored, never followed again.
    seen = {_dir_key(root)} | {_dir_key(d) for d in class_dirs}
    walked_tops: set[tuple[int, int]] = set()
    for label, class_dir in enumerate(class_dirs):
        top = _dir_key(class_dir)
        if top in walked_tops:
            ignored.append({"path": class_dir.name, "reason": "symbolic link to another class folder"})
            found = []
        else:
            walked_tops.add(top)
            found = _walk_class(root, class_dir, ignored, seen)
        if not found:
            warnings_.append(f"class folder '{class_dir.name}' has no image files")
        files.extend((path, label) for path in found)
    return FolderScan(root, [d.name for d in class_dirs], files, ignored, warnings_)


def _dir_key(path: Path | str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk_class(root: Path, class_dir: Path, ignored: list[dict], seen: set[tuple[int, int]]) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        if dirpath != str(class_dir):
            key = _dir_key(dirpath)
            if key in seen:  # a symbolic link back up the tree, or to a folder read elsewhere
                ignored.append({"path": _rel(root, dirpath), "reason": "symbolic link loop (folder already scanned)"})
                dirnames[:] = []
                continue
            seen.add(key)
        for name in sorted(dirnames):
            reason = _ignore_reason(name, True)
            if reason:
                ignored.append({"path": _rel(root, os.path.join(dirpath, name)), "reason": reason})
        dirnames[:] = sorted(d for d in dirnames if _ignore_reason(d, True) is None)
        prefix = _rel(root, dirpath) + "/"  # once per folder: relpath per file is slow at 100k files
        for name in sorted(filenames):
            reason = _ignore_reason(name, False)
            if reason is None and os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                reason = "not an image file extension"
            rel = prefix + name
            if reason:
                ignored.append({"path": rel, "reason": reason})
            else:
                found.append(rel)
    return found


def _rel(root: Path, path: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def collect_images(inputs: list[Path]) -> tuple[list[Path], list[str]]:
    """Files as given, and folders expanded to the image files inside them (recursively, with
    scan_folder's rules: hidden files and folders, __MACOSX, system files and files without
    an image extension are left out). Returns (files, notes about folders with no images)."""
    files: list[Path] = []
    notes: list[str] = []
    for item in map(Path, inputs):
        if not item.is_dir():
            files.append(item)  # named explicitly: predict tries it and reports if it cannot
            continue
        found = _walk_class(item, item, ignored=[], seen={_dir_key(item)})
        if not found:
            notes.append(f"{item}: no image files inside")
        files.extend(item / rel for rel in found)
    return files, notes


def class_imbalance(sizes: dict[str, int], ratio: float = IMBALANCE_RATIO) -> str | None:
    """A warning naming the classes when the largest has more than `ratio` times the smallest's images.

    Classes with no image are not counted: prepare leaves them out (with their own warning).
    """
    sizes = {name: n for name, n in sizes.items() if n > 0}
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
    return (
        f"classes are imbalanced: the largest, '{largest}', has {sizes[largest]} images, "
        f"{sizes[largest] / sizes[smallest]:.1f}x the smallest; under 1/{ratio:g} of it: {listed}. "
        "Accuracy will favour the large classes: add images to the small ones, train with --class-weight balanced, "
        "or read per-class recall"
    )
