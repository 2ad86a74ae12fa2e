"""The cache's stat fast path: a file whose stat is unchanged since it was hashed is not read.

Reads and writes <cache>/stat/<hash of the images folder's path>.json (checksummed,
written atomically by prepare's own process): relative path -> [device, inode, size,
mtime_ns, ctime_ns, content hash]. ctime_ns is part of the match because nobody can set it
back: os.utime restores an mtime, and the kernel moves ctime as it does, so a file edited
in place that keeps its name, size and mtime is still read and hashed again. A file
changed within RACY_NS of being read is not recorded, since coarse timestamps could let a
second edit in the same tick keep every field. Moving or renaming a file changes its path
(and ctime): it is read and hashed again, and its content found in the cache by that hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from pipeline.core.artifacts import atomic_write_bytes

FORMAT_VERSION = 2  # 2: the content hashes are BLAKE3 (cache.content_hash), no longer SHA-256
RACY_NS = 1_000_000_000  # changed this close to its read: not trusted by stat
CHECKSUM_BYTES = 16


def signature(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def recordable(st: os.stat_result, read_ns: int) -> bool:
    """Not changed within RACY_NS before it was read (time.time_ns() taken before the read)."""
    return max(st.st_mtime_ns, st.st_ctime_ns) < read_ns - RACY_NS


def _path(cache_dir: Path, images_root: Path) -> Path:
    name = hashlib.sha256(os.fsencode(os.path.abspath(images_root))).hexdigest()[:32]
    return Path(cache_dir) / "stat" / f"{name}.json"


def _checksum(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()[:CHECKSUM_BYTES]


def load(cache_dir: Path, images_root: Path) -> dict[str, list]:
    """rel path -> [dev, ino, size, mtime_ns, ctime_ns, content hash]; {} if missing or unusable."""
    try:
        data = _path(cache_dir, images_root).read_bytes()
        body, checksum = data[:-CHECKSUM_BYTES], data[-CHECKSUM_BYTES:]
        if _checksum(body) != checksum:
            return {}
        index = json.loads(body)
        if index.get("format") != FORMAT_VERSION or not isinstance(index.get("files"), dict):
            return {}
        return index["files"]
    except (OSError, ValueError, AttributeError):
        return {}


def unchanged_hash(path: str, recorded: list | None) -> str | None:
    """The content hash recorded for the file at `path` if its stat is still the recorded
    one, else None. Called by the decoding workers, so a re-run's stats are taken in parallel."""
    if recorded is None:
        return None
    try:
        return recorded[5] if signature(os.stat(path)) == recorded[:5] else None
    except OSError:
        return None


def save(cache_dir: Path, images_root: Path, files: dict[str, list]) -> None:
    """Replace the folder's index with this run's files (best effort: a cache that cannot be
    written costs the next run some reading, never this one its output)."""
    body = json.dumps({"format": FORMAT_VERSION, "files": files}, separators=(",", ":")).encode()
    path = _path(cache_dir, images_root)
    with contextlib.suppress(OSError):
        atomic_write_bytes(path, body + _checksum(body))
