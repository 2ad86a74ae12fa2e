"""Writing artifact folders atomically and reading artifacts back without running code.

Every stage writes its whole output folder under a temporary sibling name and swaps it in
only when complete, so a run killed at any moment leaves the previous folder untouched.
Each folder written so carries `MARKER`, the list of what the tool wrote there (files
written into it later, by `atomic_write_bytes`, `atomic_file` or a nested `atomic_dir`,
are added to it): a folder is only ever replaced when it is new, empty, or holds nothing
but what its marker lists, so no file of the user's is deleted with it.
Arrays load with `allow_pickle=False`; JSON is plain data. Every CSV cell the package
writes goes through `csv_row` and comes back through `csv_read` (the one escape, below).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError

TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"


MARKER = ".written-by-pipeline.json"  # in every folder atomic_dir writes: what the tool wrote there


@contextlib.contextmanager
def atomic_dir(target: Path, carried: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `target`, on failure it vanishes.

    `target` must be new, empty or wholly the tool's (see `check_replaceable`; `carried`:
    names the caller copies into the new folder itself): checked before the work and again
    just before the swap."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise PipelineError(f"{target} exists and is not a folder")
    check_replaceable(target, carried)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_TAG}{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        _write_marker(tmp, _listing(tmp))
        check_replaceable(target, carried)  # a file the user put there while the work ran
        _swap_in(tmp, target)
        _register(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_out_dir(target: Path, inputs: dict[str, Path], carried: tuple[str, ...] = ()) -> None:
    """Refuse an output folder whose swap would destroy something that is not our artifact,
    before any work: it must neither be, hold, nor sit inside one of the `inputs`, and it
    must be new, empty or wholly written by the tool (`check_replaceable`)."""
    target = Path(target)
    resolved = target.resolve()
    for name, path in inputs.items():
        other = Path(path).resolve()
        if resolved == other or other in resolved.parents or resolved in other.parents:
            raise PipelineError(
                f"--out {target} overlaps the {name} {path}: writing there would replace it; choose another folder"
            )
    if target.exists() and not target.is_dir():
        raise PipelineError(f"--out {target} exists and is not a folder")
    try:
        check_replaceable(target, carried)
    except PipelineError as e:
        raise PipelineError(f"--out {e}") from None


def check_replaceable(target: Path, carried: tuple[str, ...] = ()) -> None:
    """PipelineError unless `target` is missing, empty, or holds only what its MARKER lists
    (sub-folders with a marker of their own are held to theirs) and the `carried` names."""
    target = Path(target)
    if not target.is_dir() or not any(target.iterdir()):
        return
    foreign = [name for name in _foreign_entries(target) if name not in carried]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise PipelineError(
            f"{target} holds what pipeline did not write ({shown}); it would be replaced as a whole, "
            "deleting them: choose a new or empty folder, or move them out"
        )


def _foreign_entries(top: Path) -> list[str]:
    """Paths under `top` (relative to it) that no marker lists; the whole folder without a marker."""
    foreign: list[str] = []
    folders = [(top, _read_marker(top), "")]  # (folder, what its nearest marker lists, path from that marker)
    while folders and len(foreign) < 10:
        folder, listed, prefix = folders.pop()
        if listed is None:  # no marker: nothing in it is known to be the tool's
            return sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(folder))
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            rel = prefix + entry.name
            if (not prefix and entry.name == MARKER) or (entry.name.startswith(".") and TMP_TAG in entry.name):
                continue  # the marker; a temporary file of the tool's that a killed write left
            own = _read_marker(Path(entry.path)) if entry.is_dir(follow_symlinks=False) else None
            if rel not in listed:
                foreign.append(rel if own is None else rel + "/")
            elif own is not None:
                folders.append((Path(entry.path), own, ""))
            elif entry.is_dir(follow_symlinks=False):
                folders.append((Path(entry.path), listed, rel + "/"))
    return foreign


def _listing(folder: Path) -> list[str]:
    """Every path under `folder`, relative, sub-folders with their own marker as one entry."""
    found, folders = [], [(folder, "")]
    while folders:
        current, prefix = folders.pop()
        for entry in os.scandir(current):
            found.append(prefix + entry.name)
            if entry.is_dir(follow_symlinks=False) and not (Path(entry.path) / MARKER).is_file():
                folders.append((Path(entry.path), prefix + entry.name + "/"))
    return sorted(name for name in found if name != MARKER)


def _read_marker(folder: Path) -> set[str] | None:
    try:
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        return set(record["written"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_marker(folder: Path, written: list[str]) -> None:
    from pipeline import __version__

    record = {"written_by": f"pipeline {__version__}", "written": sorted(set(written))}
    _replace_with(folder / MARKER, (json.dumps(record, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def _register(path: Path) -> None:
    """`path` was just written into a folder of the tool's: its marker lists it from now on."""
    folder = path.parent
    written = _read_marker(folder)
    if written is not None and path.name not in written:
        _write_marker(folder, [*written, path.name])


def clean_stale(target: Path) -> list[Path]:
    """Remove temporary folders that killed runs left beside `target` (their process is gone);
    returns the ones removed, for the caller to say so."""
    removed = []
    for entry in target.parent.glob(f".{target.name}.*"):
        rest = entry.name[len(target.name) + 1 :]
        for tag in (TMP_TAG, _OLD_TAG):
            if rest.startswith(tag):
                pid = rest[len(tag) :].split("-", 1)[0]
                if pid.isdigit() and not _alive(int(pid)):
                    if tag == _OLD_TAG and not target.exists():
                        os.rename(entry, target)  # killed between the two renames: restore
                    else:
                        shutil.rmtree(entry, ignore_errors=True)
                        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_in(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if _rename_exchange(tmp, target):  # one atomic step on Linux
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = target.parent / f".{target.name}{_OLD_TAG}{os.getpid()}"
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _rename_exchange(a: Path, b: Path) -> bool:
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


# CSV formula injection (OWASP): a spreadsheet runs a cell that starts with = + - @, tab or
# CR as a formula, so such a text cell is written with a leading apostrophe, which
# spreadsheets read as "this is text" and show without it. A cell that starts with an
# apostrophe gets one more, so reading back (csv_read) is exact. Plain numbers ("-0.25")
# are left as numbers: a spreadsheet cannot run one.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def csv_cell(value):
    """One CSV cell as it is written: text that a spreadsheet would run, made inert."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_row(values) -> list:
    """csv.writer's row, every cell through csv_cell."""
    return [csv_cell(v) for v in values]


def csv_read(cell: str | None) -> str | None:
    """A cell as written by csv_cell, back to its text (a cell without the apostrophe as it is)."""
    return cell[1:] if cell and cell.startswith("'") else cell


def csv_read_row(row: dict) -> dict:
    """csv.DictReader's row with every cell through csv_read."""
    return {key: csv_read(value) if isinstance(value, str) else value for key, value in row.items()}


def atomic_write_text(path: Path, text: str, durable: bool = False) -> None:
    """Write one file under a temporary name, then replace."""
    atomic_write_bytes(path, text.encode("utf-8"), durable)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = False) -> None:
    """Write one file under a temporary name, then replace (listed in its folder's marker).
    `durable`: on disk before this returns (the file and the rename synced), for a record a
    power cut must not take back."""
    path = Path(path)
    _replace_with(path, data, durable)
    _register(path)


def _replace_with(path: Path, data: bytes, durable: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result is an ordinary file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _sync_folder(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Plain-data JSON, indented, written atomically (inside an atomic folder or on its own)."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json_optional(path: Path) -> dict | None:
    """A JSON object that may be missing or unreadable (a report made before it existed, a
    file another version wrote): None then, never an error."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def read_json(path: Path, missing_hint: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found: {missing_hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"{path} is not valid JSON ({e})") from None


def load_array(path: Path, missing_hint: str, mmap: bool = True) -> np.ndarray:
    """Load a .npy without pickle; memory-mapped so arrays larger than memory still work.

    The header is read first, so an array of Python objects (which only pickle can
    restore) is refused by name before anything else is read.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found: {missing_hint}")
    refused = f"refusing to load {path}: it holds pickled Python objects, and arrays are loaded without pickle"
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            _, _, dtype = read_header(f)
        if dtype.hasobject:
            raise PipelineError(refused)
        array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise PipelineError(refused) from None
        raise PipelineError(f"{path} is not a valid .npy array ({e})") from None
    except (OSError, EOFError) as e:
        raise PipelineError(f"{path} is not a valid .npy array ({e})") from None
    if not isinstance(array, np.ndarray) or array.dtype.hasobject:
        raise PipelineError(refused)
    return array


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a path to write one file at, in a temporary folder beside `target`: on success the
    file replaces `target` (os.replace), on failure it vanishes, and `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_TAG}{os.getpid()}-", dir=target.parent))
    try:
        yield tmp / target.name
        os.replace(tmp / target.name, target)
        _register(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
