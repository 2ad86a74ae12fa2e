"""The cache's index and packs as prepare's own process keeps them, once per prepare.

Reads <cache>/packs/ and <cache>/index.npy, writes index.npy (atomically) and deletes
packs beyond the size limit. `start_run`, before any worker looks: adopts the packs no
index names (written by a run that was killed, or that raced this one to the index), so
their entries are found. `finish_run`, after the decoding and the augmentation (or after
a failure between them): indexes the entries the workers wrote, newest first (an entry
rewritten because the old one was broken wins), deletes the packs left with no entry in
the index, then evicts the least recently used packs beyond --cache-limit-gb (a read
touches a pack's mtime). The entries' format and the workers' side are in cache.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import TMP_TAG, atomic_write_bytes
from pipeline.data.cache import (
    INDEX_DTYPE,
    INDEX_FILE,
    PACKS,
    STALE_SECONDS,
    load_index,
    pack_path,
    parse_entry,
)


def _one_per_key(index: np.ndarray) -> np.ndarray:
    """The index sorted by key, one entry per key (the first wins)."""
    index = index[np.argsort(index["key"], kind="stable")]
    keep = np.ones(len(index), dtype=bool)
    keep[1:] = index["key"][1:] != index["key"][:-1]  # the same content written twice: one entry
    return index[keep]


def _save_index(root: Path, index: np.ndarray) -> np.ndarray:
    """Write the index sorted by key, one entry per key (the first wins); return what was written."""
    index = _one_per_key(index)
    buffer = io.BytesIO()
    np.save(buffer, index, allow_pickle=False)
    with contextlib.suppress(OSError):
        atomic_write_bytes(Path(root) / INDEX_FILE, buffer.getvalue())
    return index


def _list_packs(root: Path) -> dict[str, os.stat_result]:
    """Every whole pack (name -> stat); temporary files that killed runs left go."""
    found = {}
    stale_before = time.time() - STALE_SECONDS
    with contextlib.suppress(OSError):
        for sub in os.scandir(Path(root) / PACKS):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                with contextlib.suppress(OSError):
                    st = entry.stat()
                    if entry.name.endswith(".pack"):
                        found[entry.name[: -len(".pack")]] = st
                    elif TMP_TAG in entry.name and st.st_mtime < stale_before:
                        os.unlink(entry.path)
    return found


def _scan_pack(root: Path, pack: str) -> list[tuple[str, str, int, int]]:
    """The sound entries of a pack nobody indexed, up to the first that is not."""
    try:
        with open(pack_path(root, pack), "rb") as f:
            data = f.read()
    except OSError:
        return []
    entries, offset = [], 0
    while offset < len(data):
        found = parse_entry(data[offset:], None, None)
        if isinstance(found, str):
            break
        key, length = found
        entries.append((key, pack, offset, length))
        offset += length
    return entries


def _as_index(entries: list[tuple[str, str, int, int]]) -> np.ndarray:
    return np.array([(k.encode(), p.encode(), o, n) for k, p, o, n in entries], dtype=INDEX_DTYPE)


@dataclass
class CacheRun:
    """What prepare's process knows of the cache during one run."""

    root: Path
    packs: dict[str, os.stat_result]
    index: np.ndarray
    new: list[tuple[str, str, int, int]] = field(default_factory=list)


def _packs_of(index: np.ndarray) -> set[bytes]:
    return set(np.unique(index["pack"]).tolist()) if len(index) else set()


def _delete_packs(root: Path, names) -> None:
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(pack_path(root, name))


def start_run(root: Path) -> CacheRun:
    """Adopt packs that no index names (a killed or concurrent run's) before the workers look.
    An orphan none of whose entries the index takes (each key held by another pack already:
    two runs wrote the same files) is deleted once stale, or every run would scan it again."""
    root = Path(root)
    packs = _list_packs(root)
    index = load_index(root)
    indexed = _packs_of(index)
    orphans = [name for name in packs if name.encode() not in indexed]
    if orphans:
        adopted = [entry for name in sorted(orphans) for entry in _scan_pack(root, name)]
        index = _save_index(root, np.concatenate([index, _as_index(adopted)]) if adopted else index)
        kept, stale_before = _packs_of(index), time.time() - STALE_SECONDS
        unused = [name for name in orphans if name.encode() not in kept and packs[name].st_mtime < stale_before]
        _delete_packs(root, unused)
        packs = {name: st for name, st in packs.items() if name not in unused}
    return CacheRun(root, packs, index)


def finish_run(run: CacheRun, limit_bytes: int) -> None:
    """Index this run's new entries; delete the packs that no entry is left in, then the
    least recently used packs beyond the limit."""
    if not run.new:
        return
    index = _one_per_key(np.concatenate([_as_index(run.new), run.index]))  # a rewritten entry over a broken one
    # A pack whose every entry this run wrote again (each found broken, or of another
    # format) is named by no index now: it would only be scanned, at every start, for nothing.
    _delete_packs(run.root, [name.decode() for name in _packs_of(run.index) - _packs_of(index)])
    packs = _list_packs(run.root)
    total = sum(st.st_size for st in packs.values())
    gone = set()
    for name, st in sorted(packs.items(), key=lambda item: item[1].st_mtime_ns):
        if total <= limit_bytes:
            break
        with contextlib.suppress(OSError):
            os.unlink(pack_path(run.root, name))
            gone.add(name.encode())
        total -= st.st_size
    if gone:
        index = index[~np.isin(index["pack"], list(gone))]
    _save_index(run.root, index)
