"""The user's images folder: which sub-folders are classes, which files are their images.

`scan_folder` reads IMAGES_DIR (sub-folder = class) and says what it ignored and why;
`collect_images` expands the files and folders given to predict; `class_imbalance` is
the warning prepare and inspect give about the class counts they found. Nothing here
writes to the user's folder, and nothing here opens a file: a FIFO, a device or a broken
link is listed as ignored from its directory entry. The walk keeps its own stack (no
recursion limit, however deep the folders), follows links, and lists those that lead
out of the images folder (`FolderScan.links_out`) so the user sees what was read.
"""

from __future__ import annotations

import os
import stat
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
    links_out: list[dict] = field(default_factory=list)  # {"path", "target"}: links read that leave the folder


def shown(name: str) -> str:
    """A file name as text that every file and terminal takes: bytes that were not UTF-8
    (kept by Python as lone surrogates) written as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace") if _not_utf8(name) else name


def _not_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _ignore_reason(name: str, is_dir: bool, utf8_only: bool = True) -> str | None:
    if utf8_only and _not_utf8(name):  # it could not be named in manifest.csv, report.json or audit.csv
        return f"{'folder' if is_dir else 'file'} name is not valid UTF-8 (rename it to use it)"
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
            ignored.append({"path": shown(entry.name), "reason": reason})
        else:
            class_dirs.append(entry)
    files: list[tuple[str, int]] = []
    warnings_: list[str] = []
    links_out: list[dict] = []
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
            _note_link_out(root, class_dir, class_dir.name, links_out)
            found = _walk_class(root, class_dir, ignored, seen, links_out)
        if not found:
            warnings_.append(f"class folder '{class_dir.name}' has no image files")
        files.extend((path, label) for path in found)
    return FolderScan(root, [d.name for d in class_dirs], files, ignored, warnings_, links_out)


def _dir_key(path: Path | str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk_class(
    root: Path,
    class_dir: Path,
    ignored: list[dict],
    seen: set[tuple[int, int]],
    links_out: list[dict] | None = None,
    utf8_only: bool = True,
) -> list[str]:
    """The image files under `class_dir`, as paths relative to `root`, in os.walk's order
    (a folder's files by name, then its sub-folders by name, depth first). `utf8_only`:
    names that are not UTF-8 are ignored (prepare's artifacts name every file they hold)."""
    found: list[str] = []
    folders = [str(class_dir)]
    while folders:
        folder = folders.pop()
        prefix = _rel(root, folder) + "/"  # once per folder: relpath per file is slow at 100k files
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            ignored.append({"path": shown(prefix[:-1]), "reason": f"folder cannot be read ({e.strerror or e})"})
            continue
        subfolders = []
        for entry in entries:
            rel = prefix + entry.name
            is_dir = _is_dir(entry)
            reason = _ignore_reason(entry.name, is_dir, utf8_only)
            if reason is None and is_dir:
                key = _dir_key(entry.path)
                if key in seen:  # a symbolic link back up the tree, or to a folder read elsewhere
                    reason = "symbolic link loop (folder already scanned)"
                else:
                    seen.add(key)
                    subfolders.append(entry.path)
            elif reason is None:
                reason = _file_reason(entry)
            if reason:
                ignored.append({"path": shown(rel), "reason": reason})
                continue
            if links_out is not None and entry.is_symlink():
                _note_link_out(root, entry.path, rel, links_out)
            if not is_dir:
                found.append(rel)
        folders.extend(reversed(subfolders))
    return found


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a link
    except OSError:
        return False


def _file_reason(entry: os.DirEntry) -> str | None:
    """Why a directory entry that is not a folder is not an image file to read, or None."""
    if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
        return "not an image file extension"
    try:
        mode = entry.stat().st_mode  # follows a link; cached from the listing for the others
    except OSError:
        return "broken symbolic link" if entry.is_symlink() else "cannot be read"
    if stat.S_ISREG(mode):
        return None
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket or other special file"
    )
    return f"not a regular file ({kind}): not read"


def _note_link_out(root: Path, path: Path | str, rel: str, links_out: list[dict]) -> None:
    """List `path` when it is a link whose target lies outside the images folder."""
    if not os.path.islink(path):
        return
    target, inside = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([target, inside]) != inside:
        links_out.append({"path": shown(rel), "target": shown(target)})


_NOTED = ("not a regular file", "folder cannot be read", "broken symbolic link")  # worth a note in predict


def _rel(root: Path, path: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def collect_images(inputs: list[Path]) -> tuple[list[Path], list[str]]:
    """Files as given, and folders expanded to the image files inside them (recursively, with
    scan_folder's rules: hidden files and folders, __MACOSX, system files and files without
    an image extension are left out; a FIFO, a device or an unreadable folder is named in a
    note). Returns (files, notes about what was passed over)."""
    files: list[Path] = []
    notes: list[str] = []
    for item in map(Path, inputs):
        if not item.is_dir():
            files.append(item)  # named explicitly: predict tries it and reports if it cannot
            continue
        ignored: list[dict] = []
        found = _walk_class(item, item, ignored, seen={_dir_key(item)}, utf8_only=False)
        notes += [f"{shown(str(item / i['path']))}: {i['reason']}" for i in ignored if i["reason"].startswith(_NOTED)]
        if not found:
            notes.append(f"{shown(str(item))}: no image files inside")
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
