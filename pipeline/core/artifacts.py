"""Writing artifact folders atomically and reading artifacts back without running code.

Every stage writes its whole output folder under a temporary sibling name and swaps it in
only when complete, so a run killed at any moment leaves the previous folder untouched.
Arrays load with `allow_pickle=False`; JSON is plain data.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError

TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `target`, on failure it vanishes."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise PipelineError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_TAG}{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_out_dir(target: Path, marker: str, inputs: dict[str, Path]) -> None:
    """Refuse an output folder whose swap would destroy something that is not our artifact.

    The whole folder is replaced, so it must be new, empty, or one this stage wrote before
    (it holds `marker`), and it must neither be, hold, nor sit inside one of the `inputs`.
    """
    target = Path(target)
    resolved = target.resolve()
    for name, path in inputs.items():
        other = Path(path).resolve()
        if resolved == other or other in resolved.parents or resolved in other.parents:
            raise PipelineError(
                f"--out {target} overlaps the {name} {path}: writing there would replace it; choose another folder"
            )
    if target.is_dir() and not (target / marker).is_file() and any(target.iterdir()):
        raise PipelineError(
            f"--out {target} already holds files this stage did not write (no {marker}); "
            "it would be replaced as a whole: choose a new or empty folder"
        )


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


def atomic_write_text(path: Path, text: str, durable: bool = False) -> None:
    """Write one file under a temporary name, then replace."""
    atomic_write_bytes(path, text.encode("utf-8"), durable)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = False) -> None:
    """Write one file under a temporary name, then replace. `durable`: on disk before this
    returns (the file and the rename synced), for a record a power cut must not take back."""
    path = Path(path)
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
