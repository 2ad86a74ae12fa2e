"""prepare's per-file cache: every decoded file's row and small results, kept by content.

Reads and writes a cache folder (default `.cache` beside prepare's --out: artifacts/.cache);
never the images folder. Every file in it is written under a temporary name and swapped in
with os.replace, so a run killed at any point leaves only whole files, and no lock is
needed between worker processes (local, or a Dask cluster's on shared storage):

- An entry is one decoded file: MAGIC, a JSON header (its key, the row's shape, the file's
  results as decoding returns them, JSON-able: skip reason, digests, hashes, any per-file
  score decoding adds), the pixels, and a checksum of all of it. Its key hashes the file's
  bytes (`content_hash`) with everything that changes the result (`entry_key`: --size,
  --color, images.PREPROCESS_VERSION, decoding's RESULTS_VERSION, pipeline's and Pillow's
  versions, FORMAT_VERSION). An entry that is truncated, fails its checksum or is foreign
  (another key, format or program) is not used: the file is decoded again (`CacheCounts`).
- packs/<x>/<id>.pack: the entries one worker task wrote, back to back (a file per entry
  cost a file creation each, 40-140 us on this disk, 4-14 % of decoding a photo; a pack
  costs one per 32 entries). Packs never change once written.
- index.npy: key -> (pack, offset, length), sorted by key; workers memory-map it and look
  keys up by binary search. prepare's own process rewrites it (cache_index.py) after the
  decoding, and before it to adopt packs that a killed or concurrent run did not index:
  the packs are the truth, the index only finds them, so a lost or broken index costs
  one scan of the packs, never a wrong row.
- stat/: the stat fast path (data/stat_index.py).

The size limit is kept by cache_index.finish_run: least recently used packs (a read
touches its mtime) go first. Deleting the folder clears the cache; `make clean` does
(rm -rf artifacts).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import math
import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
from blake3 import blake3
from xxhash import xxh3_64, xxh3_64_intdigest

from pipeline import __version__
from pipeline.core.artifacts import atomic_write_bytes
from pipeline.core.errors import PipelineError
from pipeline.data.images import PREPROCESS_VERSION

FORMAT_VERSION = 3  # 2: content hashed with BLAKE3 (not SHA-256); 3: entries checked by XXH3-64, not CRC-32
MAGIC = b"PLCACHE" + bytes([FORMAT_VERSION])  # another format's entries are foreign from their first bytes
CHECKSUM = struct.Struct("<Q")
CHECKSUM_BYTES = CHECKSUM.size
INDEX_FILE, PACKS = "index.npy", "packs"
INDEX_DTYPE = np.dtype([("key", "S40"), ("pack", "S32"), ("offset", "<u8"), ("length", "<u4")])
IN_MEMORY_KEYS = 1_000_000  # up to 84 MB of index per worker in memory; beyond, searched on the map
STALE_SECONDS = 3600  # temporary files older than this were left by killed runs
_HEADER_LEN = struct.Struct("<I")
_BINARY = getattr(os, "O_BINARY", 0)  # Windows would translate line ends without it
# json.loads without its encoding sniffing and its whitespace check: a few us of each
# entry read; what the header's bytes may hide after its JSON, the checksum catches
_HEADER_DECODER = json.JSONDecoder()


def cache_dir_for(chosen: str, no_cache: bool, out_dir: Path, images_dir: Path) -> Path | None:
    """The cache folder a prepare uses: --cache, else .cache beside --out (not in it:
    prepare replaces --out as a whole); None with --no-cache."""
    if no_cache:
        return None
    folder = Path(chosen) if chosen else Path(out_dir).parent / ".cache"
    resolved = folder.resolve()
    for name, other in (("images folder", Path(images_dir)), ("--out folder", Path(out_dir))):
        other = other.resolve()
        if resolved == other or other in resolved.parents or resolved in other.parents:
            raise PipelineError(f"--cache {folder} overlaps the {name} {other}: choose another folder")
    if folder.exists() and not folder.is_dir():
        raise PipelineError(f"--cache {folder} exists and is not a folder")
    return folder


def note(counts: CacheCounts, folder: Path, n_files: int) -> str:
    """One line for stderr: what the cache served."""
    line = f"cache {folder}: {counts.hits} of {n_files} files from the cache ({counts.unread} not read again)"
    augmented = counts.augmented_hits + counts.augmented_misses
    if augmented:
        line += f", and the augmented copies of {counts.augmented_hits} of {augmented} training images"
    recomputed = sum(counts.recomputed.values())
    if recomputed:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.recomputed.items()))
        line += f"; {recomputed} unusable entries decoded again ({reasons})"
    return line


def report_section(counts: CacheCounts | None) -> dict:
    """report.json's "cache" key, only when unusable entries were decoded again: a run
    served from a sound cache writes the very report.json a fresh run does."""
    if counts is None or not counts.recomputed:
        return {}
    return {
        "cache": {
            "entries_recomputed": sum(counts.recomputed.values()),
            "reasons": dict(sorted(counts.recomputed.items())),
        }
    }


def content_hash(data: bytes) -> str:
    """BLAKE3 of a file's bytes: a cryptographic hash, as SHA-256 would be, at a third of
    its time here even with SHA-256 in hardware (18 against 53 us for a 60 KB photo, 2 %
    of decoding it)."""
    return blake3(data).hexdigest()[:40]


def entry_key(content: str, size: int, color: str, results_version: int) -> str:
    """The entry of one file's content as decoded at --size and --color by this pipeline,
    this Pillow (its codecs decide the pixels) and this preprocessing."""
    versions = f"{FORMAT_VERSION}/{results_version}/{PREPROCESS_VERSION}/{__version__}/{PIL.__version__}"
    salt = f"pixels/{versions}/{size}/{color}/{content}"
    return hashlib.blake2b(salt.encode(), digest_size=20).hexdigest()


@dataclass
class CacheCounts:
    """What one task (or the whole run, summed) found in the cache."""

    hits: int = 0  # results served from an entry, the file not decoded
    unread: int = 0  # of the hits, files not even read (the stat fast path)
    misses: int = 0  # no entry: decoded, and an entry written
    recomputed: dict[str, int] = field(default_factory=dict)  # unusable entries by reason: decoded again
    augmented_hits: int = 0  # training images whose augmented copies came from an entry
    augmented_misses: int = 0  # ... that were drawn, and an entry written

    def add(self, other: CacheCounts) -> None:
        self.hits += other.hits
        self.unread += other.unread
        self.misses += other.misses
        self.augmented_hits += other.augmented_hits
        self.augmented_misses += other.augmented_misses
        for reason, n in other.recomputed.items():
            self.recomputed[reason] = self.recomputed.get(reason, 0) + n


class EntryStore:
    """A worker task's view of the cache: look entries up, collect new ones into one pack."""

    def __init__(self, root: str | Path):
        self.root = os.fspath(root)
        self._index: np.ndarray | None = None
        self._keys = None
        self._fds: dict[str, int] = {}
        self._pending: list[bytes] = []
        self._new: list[tuple[str, int, int]] = []  # (key, offset, length) in the pack to come
        self._pack_bytes = 0

    def get(self, key: str, shape: tuple[int, ...], counts: CacheCounts) -> tuple[np.ndarray, dict] | None:
        """(row, results) of a sound entry, else None: a missing one is a miss, an unusable
        one is counted in `counts.recomputed` by reason."""
        if self._index is None:
            self._index, self._keys = _worker_index(self.root)
        index, keys, wanted = self._index, self._keys, key.encode()
        at = int(np.searchsorted(keys, wanted)) if isinstance(keys, np.ndarray) else bisect.bisect_left(keys, wanted)
        if at == len(index) or keys[at] != wanted:
            return None
        found = index[at]
        pack, offset, length = found["pack"].decode(), int(found["offset"]), int(found["length"])
        try:
            fd = self._open(pack)
            os.lseek(fd, offset, os.SEEK_SET)  # not os.pread: Windows has none
            data = os.read(fd, length)
        except OSError:  # evicted by another run since the index was written: a plain miss
            return None
        found = parse_entry(data, key, shape)
        if isinstance(found, str):
            counts.recomputed[found] = counts.recomputed.get(found, 0) + 1
            return None
        return found

    def _open(self, pack: str) -> int:
        if pack not in self._fds:
            path = pack_path(self.root, pack)
            self._fds[pack] = os.open(path, os.O_RDONLY | _BINARY)
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: evicted last
        return self._fds[pack]

    def put(self, key: str, row: np.ndarray, results) -> None:
        """Add an entry: `results` is JSON-able but for bytes and numpy values (see _json_default).
        The header is json.dumps' own text of {"key", "shape", "results"}, put together here
        (the key is hex, the shape integers): json.dumps of the whole dict was 7 us of the
        17 us an entry took, and an augmented copies' entry has no results to encode."""
        results_text = json.dumps(results, default=_json_default) if len(results) else "[]"
        shape = ", ".join(map(str, row.shape))
        header = f'{{"key": "{key}", "shape": [{shape}], "results": {results_text}}}'.encode()
        # pieces, checksummed as they stand: the pixels not copied until the pack is written
        pixels = memoryview(np.ascontiguousarray(row, dtype=np.uint8)).cast("B")
        pieces = (MAGIC, _HEADER_LEN.pack(len(header)), header, pixels)
        checksum = xxh3_64()
        for piece in pieces:
            checksum.update(piece)
        length = sum(map(len, pieces)) + CHECKSUM_BYTES
        self._new.append((key, self._pack_bytes, length))
        self._pending.extend((*pieces, CHECKSUM.pack(checksum.intdigest())))
        self._pack_bytes += length

    def flush(self) -> list[tuple[str, str, int, int]]:
        """Write the task's new entries as one pack; return their (key, pack, offset, length).
        A cache that cannot be written (full disk, removed folder, read-only share) costs
        the next run a decode, never this one its output."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if not self._pending:
            return []
        pack = uuid.uuid4().hex
        path = pack_path(self.root, pack)
        try:
            atomic_write_bytes(path, b"".join(self._pending))  # makes the pack's folder
        except OSError:
            return []
        return [(key, pack, offset, length) for key, offset, length in self._new]


def pack_path(root: str | Path, pack: str) -> str:
    return os.path.join(root, PACKS, pack[:1], f"{pack}.pack")  # 16 folders: a new one costs 1 ms here


def parse_entry(data: bytes, key: str | None, shape: tuple[int, ...] | None) -> tuple[np.ndarray, list] | str:
    """The entry's (row, results), or why it cannot be used: truncated, corrupt or foreign.
    `key` and `shape` None: any sound entry (scanning a pack), its key in results' place."""
    if not data.startswith(MAGIC):
        return "foreign" if len(data) >= len(MAGIC) else "truncated"
    start = len(MAGIC) + _HEADER_LEN.size
    if len(data) < start:
        return "truncated"
    (header_len,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
    try:
        header, _ = _HEADER_DECODER.raw_decode(data[start : start + header_len].decode())
        row_bytes = math.prod(header["shape"])
    except (ValueError, KeyError, TypeError):
        return "truncated" if len(data) < start + header_len else "corrupt"
    end = start + header_len + row_bytes
    if len(data) < end + CHECKSUM_BYTES:
        return "truncated"
    if _checksum(memoryview(data)[:end]) != data[end : end + CHECKSUM_BYTES]:
        return "corrupt"
    if key is None:
        return header["key"], end + CHECKSUM_BYTES
    if header.get("key") != key or tuple(header["shape"]) != tuple(shape) or len(data) != end + CHECKSUM_BYTES:
        return "foreign"  # a sound entry, but not this one
    row = np.frombuffer(data, dtype=np.uint8, count=row_bytes, offset=start + header_len).reshape(shape)
    return row, header["results"]


def _checksum(body) -> bytes:
    """XXH3-64, against truncation and corruption, not forgery (the key in the header,
    checked after, is what makes an entry this file's): 0.5 us for a 64 px row where CRC-32
    took 6 us, and every entry written and read is checked. EntryStore.put computes the
    same over an entry's pieces."""
    return CHECKSUM.pack(xxh3_64_intdigest(body))


def _json_default(value):
    """What json cannot write itself: bytes as {"hex": ...}, numpy values as Python ones
    (numpy floats are floats to json already). Tuples come back as lists."""
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} cannot go into a cache entry")


# --- the index: written by prepare's own process (cache_index.py), read by every worker ---


_loaded: dict[str, tuple] = {}  # per worker process: root -> (the index file's identity, index, keys)


def _worker_index(root: str):
    """The index, loaded once per worker process while the file stays the same (prepare
    replaces it, never edits it): in memory, its keys contiguous for searchsorted, unless
    it is very large (then memory-mapped, searched by bisect: searchsorted would copy the
    strided keys whole for each look-up)."""
    try:
        st = os.stat(os.path.join(root, INDEX_FILE))
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        identity = None
    if root not in _loaded or _loaded[root][0] != identity:
        index = load_index(root, mmap=True)
        if len(index) <= IN_MEMORY_KEYS:  # plain arrays: a memmap's item access costs 10 us
            index = np.array(index)
            _loaded[root] = (identity, index, np.ascontiguousarray(index["key"]))
        else:
            _loaded[root] = (identity, index, index["key"])
    return _loaded[root][1:]


def load_index(root: str | Path, mmap: bool = False) -> np.ndarray:
    """The index (sorted by key), or an empty one if it is missing or unreadable."""
    try:
        index = np.load(os.path.join(root, INDEX_FILE), mmap_mode="r" if mmap else None, allow_pickle=False)
        if index.dtype == INDEX_DTYPE and index.ndim == 1:
            return index
    except (OSError, ValueError, EOFError):
        pass
    return np.zeros(0, dtype=INDEX_DTYPE)
